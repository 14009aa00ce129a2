"""The engine under faults, judged only by system-wide invariants (the checker) and the
side-effect counts. At-least-once allows an idempotent step to run again when its worker
died after the effect but before the success was recorded; it never allows a second
recorded success, a stale token's write, or any run of an "idempotent": false step after
its first attempt ended without a record."""

from __future__ import annotations

import collections
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psycopg
import pytest

from chaos.checker import Report, check_database
from engine.embedded import EmbeddedCluster
from engine.migrate import upgrade_head
from tests.pgfixtures import server_home
from tests.support import (
    ROOT,
    Proc,
    base_env,
    events,
    query,
    random_delay_dag,
    steps_by_name,
    submit,
    wait_for,
    wait_run_finished,
    workers,
)


def check(db_url: str, run_ids: list[str]) -> Report:
    with psycopg.connect(db_url) as conn:
        report = check_database(conn, run_ids)
    assert report.ok, "\n".join(f"{v.kind} {v.step}: {v.detail}" for v in report.violations)
    return report


def succeeded_once(db_url: str, run_id: str) -> None:
    counts = collections.Counter(
        e["step_name"] for e in events(db_url, run_id) if e["event"] == "step_succeeded"
    )
    steps = steps_by_name(db_url, run_id)
    assert set(counts) == set(steps) and set(counts.values()) == {1}, counts


def delays(n: int, lo: int, hi: int, seed: int = 1) -> dict[str, Any]:
    return random_delay_dag(n, lo, hi, seed=seed)


def test_demo_with_fixed_seed_passes(db_url: str, tmp_path: Path) -> None:
    env = {**base_env(db_url), "PGDAG_HOME": str(tmp_path / "home")}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "chaos",
            "--seed",
            "7",
            "--steps",
            "30",
            "--kill-every",
            "2",
            "--workers",
            "3",
            "--timeout",
            "150",
        ],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=200,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert "PASS" in out and "kill -9" in out
    assert "invariant violations" in out


def test_sigkill_loop(db_url: str, tmp_path: Path) -> None:
    """Kill a worker holding a step every ~0.7 s while a 60-step DAG runs."""
    run_id = submit(db_url, delays(60, 100, 600))
    rng = random.Random(3)
    procs: list[Proc] = []
    n = 0

    def spawn() -> None:
        nonlocal n
        procs.append(
            Proc(
                ["-m", "workers", "--concurrency", "3", "--worker-id", f"k{n}"],
                base_env(db_url),
                tmp_path / f"k{n}.log",
            )
        )
        n += 1

    for _ in range(3):
        spawn()
    kills = 0
    try:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            status = query(db_url, "SELECT status FROM runs WHERE id = %(id)s", {"id": run_id})
            if status[0]["status"] in ("completed", "failed"):
                break
            live = [p for p in procs if p.popen.poll() is None]
            holders = {
                r["lease_owner"]
                for r in query(db_url, "SELECT lease_owner FROM steps WHERE status = 'running'")
            }
            victims = [p for p in live if any(f"k{procs.index(p)}" == h for h in holders)]
            if victims and kills < 12:
                rng.choice(victims).kill()
                kills += 1
                spawn()
            time.sleep(0.7)  # the kill schedule itself, not a wait for a condition
        assert wait_run_finished(db_url, run_id, timeout_s=60) == "completed"
    finally:
        for p in procs:
            p.stop()
    assert kills >= 5
    report = check(db_url, [run_id])
    assert report.leases_expired >= 1
    succeeded_once(db_url, run_id)


def test_random_crash_points(db_url: str, tmp_path: Path) -> None:
    """Workers crash themselves before, during or after a tool (--random-failures) and are
    replaced; every step still succeeds exactly once in the record."""
    run_id = submit(db_url, delays(40, 20, 200, seed=5))
    procs: list[Proc] = []

    def spawn(i: int) -> Proc:
        return Proc(
            [
                "-m",
                "workers",
                "--concurrency",
                "2",
                "--worker-id",
                f"c{i}",
                "--random-failures",
                "0.15",
                "--crash-seed",
                str(i),
            ],
            base_env(db_url),
            tmp_path / f"c{i}.log",
        )

    procs = [spawn(i) for i in range(2)]
    crashes = 0
    try:

        def finished() -> bool:
            nonlocal crashes
            for j, p in enumerate(procs):
                if p.popen.poll() is not None:
                    p.stop()  # reaps it and closes its log
                    crashes += 1
                    procs[j] = spawn(len(procs) + crashes + 10)
            return (
                query(db_url, "SELECT status FROM runs WHERE id = %(id)s", {"id": run_id})[0][
                    "status"
                ]
                == "completed"
            )

        wait_for(finished, timeout_s=120, interval_s=0.1, what="run to complete under crashes")
    finally:
        for p in procs:
            p.stop()
    assert crashes >= 2
    check(db_url, [run_id])
    succeeded_once(db_url, run_id)


def test_zombie_past_its_lease(db_url: str, tmp_path: Path) -> None:
    run_id = submit(
        db_url,
        {"steps": [{"name": f"z{i}", "tool": "DELAY", "input": {"ms": 1500}} for i in range(6)]},
    )
    with workers(db_url, tmp_path, n=1, concurrency=6, id_prefix="zombie") as [zombie]:
        wait_for(
            lambda: (
                query(db_url, "SELECT count(*) AS n FROM steps WHERE status = 'running'")[0]["n"]
                == 6
            ),
            what="all six running on the zombie",
        )
        zombie.signal(signal.SIGSTOP)
        stale_tokens = {
            e["lease_token"] for e in events(db_url, run_id) if e["event"] == "step_claimed"
        }
        assert len(stale_tokens) == 6
        with workers(db_url, tmp_path, n=2, id_prefix="alive"):
            wait_for(
                lambda: (
                    sum(e["event"] == "step_lease_expired" for e in events(db_url, run_id)) == 6
                ),
                what="six expired leases",
            )
            zombie.signal(signal.SIGCONT)
            assert wait_run_finished(db_url, run_id) == "completed"
            # Its results are refused: "lease token N is stale" once a live worker claimed the
            # step again, "attempt with token N was ended (ready)" when it reports first.
            wait_for(
                lambda: "lease" in zombie.output() or " refused: " in zombie.output(),
                what="the zombie to notice",
            )
    report = check(db_url, [run_id])
    assert report.leases_expired == 6
    succeeded_once(db_url, run_id)
    # The zombie may legitimately claim a requeued step after SIGCONT (with a
    # fresh token); what it must never do is record a result under a lease it lost.
    winning_tokens = {
        e["lease_token"] for e in events(db_url, run_id) if e["event"] == "step_succeeded"
    }
    assert len(winning_tokens) == 6
    assert not winning_tokens & stale_tokens


def test_postgres_restart_twice(tmp_path_factory: pytest.TempPathFactory, tmp_path: Path) -> None:
    cluster = EmbeddedCluster(server_home(tmp_path_factory, "chaos-pg"))
    try:
        url = cluster.start()
        upgrade_head(url)
        run_id = submit(url, delays(50, 100, 400, seed=9))
        with workers(url, tmp_path, n=2):
            for threshold in (5, 20):
                wait_for(
                    lambda t=threshold: (
                        query(url, "SELECT count(*) AS n FROM steps WHERE status = 'succeeded'")[0][
                            "n"
                        ]
                        >= t
                    ),
                    what="progress before a restart",
                )
                cluster.stop()
                cluster.start()
            assert wait_run_finished(url, run_id, timeout_s=90) == "completed"
        check(url, [run_id])
        succeeded_once(url, run_id)
    finally:
        cluster.stop()


def test_eight_workers_race_on_2000_steps(db_url: str, tmp_path: Path) -> None:
    body = {
        "steps": [{"name": "root", "tool": "DELAY", "input": {"ms": 0}}]
        + [
            {"name": f"s{i}", "tool": "DELAY", "input": {"ms": 0}, "dependsOn": ["root"]}
            for i in range(1998)
        ]
        + [
            {
                "name": "join",
                "tool": "DELAY",
                "input": {"ms": 0},
                "dependsOn": [f"s{i}" for i in range(0, 1998, 7)],
            }
        ]
    }
    # a longer lease than the suite's 2 s: 8 workers and Postgres share 2 cores here, and
    # this test is about racing for claims, not about expiry
    with workers(db_url, tmp_path, n=8, concurrency=4, PGDAG_LEASE_TTL="15"):
        # All eight registered (their claim loops about to start) before there is work: a
        # worker still importing on a loaded machine would otherwise miss the whole race.
        wait_for(
            lambda: (
                query(db_url, "SELECT count(*) AS n FROM workers WHERE status = 'running'")[0]["n"]
                == 8
            ),
            timeout_s=60,
            what="the eight workers to register",
        )
        run_id = submit(db_url, body)
        assert wait_run_finished(db_url, run_id, timeout_s=150) == "completed"
    report = check(db_url, [run_id])
    assert report.attempts == 2000
    succeeded_once(db_url, run_id)
    claimers = {e["worker_id"] for e in events(db_url, run_id) if e["event"] == "step_claimed"}
    assert len(claimers) == 8  # all eight really raced


def test_kill_after_flag_sigkills_the_worker_and_its_step_is_recovered(
    db_url: str, tmp_path: Path
) -> None:
    run_id = submit(db_url, {"steps": [{"name": "long", "tool": "DELAY", "input": {"ms": 4000}}]})
    doomed = Proc(
        ["-m", "workers", "--worker-id", "doomed", "--kill-after", "2"],
        base_env(db_url),
        tmp_path / "doomed.log",
    )
    try:
        assert doomed.popen.wait(timeout=30) == -signal.SIGKILL
    finally:
        doomed.stop()
    assert steps_by_name(db_url, run_id)["long"]["lease_owner"] == "doomed"
    with workers(db_url, tmp_path, n=1, id_prefix="heir"):
        assert wait_run_finished(db_url, run_id) == "completed"
    kinds = [e["event"] for e in events(db_url, run_id) if e["step_name"] == "long"]
    assert kinds == ["step_claimed", "step_lease_expired", "step_claimed", "step_succeeded"]
