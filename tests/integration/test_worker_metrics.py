"""``python -m workers --metrics-port`` (docs/operations.md, "Metrics"): a real worker
subprocess serves ``/metrics`` while runs go by, and its counters and histograms move by
exactly what it did.

What goes by, each in a run of its own (a dead letter must not cancel a neighbour):
a step that fails once and then succeeds (a retry), one that fails both of its two
attempts (a retry, then a dead letter), one whose output jsonb cannot store (failed for
good: a dead letter without a retry), and one whose lease expires: this test claims it as
a worker that then vanishes, so the worker's reaper requeues it (a lease expiry) and the
worker runs it; and a DELAY step whose lease this test takes away while it runs (its token
changed under the worker, as if another worker had claimed it), so that the worker's
heartbeat abandons the attempt (lease_lost, a fencing refusal), the lease expires, the
reaper requeues the step (a second lease expiry) and the worker runs it again. No API
runs, so the worker's reaper is the only one. Every scrape is parsed with
``prometheus_client.parser``.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from engine.db import open_pool
from engine.store import Store
from tests import testtools
from tests.support import (
    Proc,
    api_server,
    base_env,
    free_port,
    query,
    submit,
    wait_for,
    wait_run_finished,
)
from workers.supervisor import child_argv

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]

assert testtools.fail_times  # registers the TEST_* tools in this process (for `submit`)
FAIL = "TEST_FAIL_TIMES"
NUL = "TEST_NUL_OUTPUT"
ECHO = "TEST_ECHO"
DELAY = "DELAY"


def scrape(url: str) -> Samples:
    """Every sample of the worker's ``/metrics``, keyed by (sample name, labels)."""
    r = httpx.get(url, timeout=5)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/plain"), r.headers
    samples: Samples = {}
    for family in text_string_to_metric_families(r.text):
        for s in family.samples:
            key = (s.name, frozenset(s.labels.items()))
            assert key not in samples, f"sample {key} exported twice"
            samples[key] = s.value
    return samples


def value(samples: Samples, name: str, **labels: str) -> float:
    """The sample's value; 0 when absent (a labelled counter appears at its first inc)."""
    return samples.get((name, frozenset(labels.items())), 0.0)


def claim_and_vanish(db_url: str, tool: str) -> None:
    """Claim one ready step of `tool` as worker ``ghost``, which never heartbeats: its
    lease expires after PGDAG_LEASE_TTL (2 s in tests)."""

    async def go() -> None:
        pool = await open_pool(db_url, min_size=1, max_size=1)
        try:
            claimed = await Store(pool, lease_ttl_s=2).claim("ghost", 1, tools=[tool])
            assert len(claimed) == 1, claimed
        finally:
            await pool.close()

    asyncio.run(go())


def test_worker_metrics_move_by_what_it_did(db_url: str, tmp_path: Path) -> None:
    expiring = submit(db_url, {"steps": [{"name": "expiring", "tool": ECHO, "input": {}}]})
    claim_and_vanish(db_url, ECHO)
    port = free_port()
    url = f"http://127.0.0.1:{port}/metrics"
    worker = Proc(
        ["-m", "workers", "--concurrency", "4", "--worker-id", "m0", "--metrics-port", str(port)],
        base_env(db_url, PGDAG_TOOLS="tests.testtools"),
        tmp_path / "worker-m0.log",
    )
    try:

        def up() -> Samples | None:
            if worker.popen.poll() is not None:
                raise AssertionError("worker exited:\n" + worker.output())
            try:
                return scrape(url)
            except httpx.TransportError:
                return None

        wait_for(up, timeout_s=30, what="the worker's /metrics")
        runs = [
            submit(db_url, {"steps": [step]})
            for step in (
                {"name": "retried", "tool": FAIL, "input": {"failTimes": 1}, "maxAttempts": 3},
                {"name": "dead", "tool": FAIL, "input": {"failTimes": 5}, "maxAttempts": 2},
                {"name": "refused", "tool": NUL, "input": {}, "maxAttempts": 3},
            )
        ]

        def settled() -> list[str] | None:
            rows = query(
                db_url,
                "SELECT s.status FROM steps s WHERE s.run_id = ANY(%(ids)s) ORDER BY s.run_id",
                {"ids": [*runs, expiring]},
            )
            statuses = sorted(r["status"] for r in rows)
            want = ["dead_letter", "dead_letter", "succeeded", "succeeded", "succeeded"]
            return statuses if statuses == want else None

        stolen = submit(
            db_url, {"steps": [{"name": "stolen", "tool": DELAY, "input": {"ms": 3000}}]}
        )
        wait_for(
            lambda: query(
                db_url,
                "UPDATE steps SET lease_token = lease_token + 1000"
                " WHERE run_id = %(id)s AND status = 'running' RETURNING id",
                {"id": stolen},
            ),
            timeout_s=30,
            interval_s=0.01,
            what="the DELAY step running, to take its lease away",
        )
        runs.append(stolen)
        wait_for(settled, timeout_s=60, what="every step succeeded or dead-lettered")
        # The counters move once the outcome is recorded, a hair after the row changed.
        after = wait_for(
            lambda: (
                (s := scrape(url))
                and value(s, "pgdag_attempts_total", tool=ECHO, outcome="succeeded") == 1
                and value(s, "pgdag_dead_letters_total", tool=FAIL) == 1
                and value(s, "pgdag_dead_letters_total", tool=NUL) == 1
                and value(s, "pgdag_attempts_total", tool=FAIL, outcome="succeeded") == 1
                and value(s, "pgdag_attempts_total", tool=DELAY, outcome="succeeded") == 1
                and s
            ),
            timeout_s=20,
            what="the worker's counters",
        )
        expected = {
            ("pgdag_attempts_total", (("tool", FAIL), ("outcome", "succeeded"))): 1,
            ("pgdag_attempts_total", (("tool", FAIL), ("outcome", "failed"))): 3,
            ("pgdag_attempts_total", (("tool", FAIL), ("outcome", "lease_lost"))): 0,
            ("pgdag_attempts_total", (("tool", NUL), ("outcome", "failed"))): 1,
            ("pgdag_attempts_total", (("tool", NUL), ("outcome", "succeeded"))): 0,
            ("pgdag_attempts_total", (("tool", ECHO), ("outcome", "succeeded"))): 1,
            ("pgdag_retries_total", (("tool", FAIL),)): 2,
            ("pgdag_retries_total", (("tool", NUL),)): 0,
            ("pgdag_dead_letters_total", (("tool", FAIL),)): 1,
            ("pgdag_dead_letters_total", (("tool", NUL),)): 1,
            ("pgdag_dead_letters_total", (("tool", ECHO),)): 0,
            ("pgdag_fencing_refusals_total", (("tool", FAIL),)): 0,
            ("pgdag_attempts_total", (("tool", DELAY), ("outcome", "lease_lost"))): 1,
            ("pgdag_attempts_total", (("tool", DELAY), ("outcome", "succeeded"))): 1,
            ("pgdag_fencing_refusals_total", (("tool", DELAY),)): 1,
            ("pgdag_retries_total", (("tool", DELAY),)): 0,
            # The ghost's lease, and the one taken from the DELAY step.
            ("pgdag_lease_expiries_total", ()): 2,
            # Claims: FAIL 2 + 2 attempts, NUL 1, ECHO 1 (after the reaper requeued it).
            ("pgdag_ready_to_start_seconds_count", (("tool", FAIL),)): 4,
            ("pgdag_ready_to_start_seconds_count", (("tool", NUL),)): 1,
            ("pgdag_ready_to_start_seconds_count", (("tool", ECHO),)): 1,
            ("pgdag_ready_to_start_seconds_count", (("tool", DELAY),)): 2,
            # Durations of recorded results (succeeded or failed).
            ("pgdag_attempt_duration_seconds_count", (("tool", FAIL),)): 4,
            ("pgdag_attempt_duration_seconds_count", (("tool", NUL),)): 1,
            ("pgdag_attempt_duration_seconds_count", (("tool", ECHO),)): 1,
            # The abandoned DELAY attempt recorded nothing: one duration, its second's.
            ("pgdag_attempt_duration_seconds_count", (("tool", DELAY),)): 1,
        }
        got = {key: value(after, key[0], **dict(key[1])) for key in expected}
        assert got == expected
        assert value(after, "pgdag_ready_to_start_seconds_sum", tool=FAIL) >= 0
        assert value(after, "pgdag_attempt_duration_seconds_sum", tool=FAIL) > 0
        assert value(after, "pgdag_attempt_duration_seconds_sum", tool=DELAY) >= 3.0
        # A worker does not export the API's gauges (they are the API's to read).
        assert not any(name == "pgdag_steps_ready" for name, _ in after)
        # Nothing moves afterwards: no attempt was counted twice, none late.
        assert {key: value(scrape(url), key[0], **dict(key[1])) for key in expected} == expected
    finally:
        worker.stop()


def test_metrics_port_in_use_is_a_config_error(db_url: str, tmp_path: Path) -> None:
    """A worker whose --metrics-port is taken exits 2 with one line, before claiming."""
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = Proc(
            ["-m", "workers", "--worker-id", "busy", "--metrics-port", str(port)],
            base_env(db_url),
            tmp_path / "worker-busy.log",
        )
        code = proc.popen.wait(timeout=60)
        proc.stop()
    assert code == 2, proc.output()
    assert f"cannot serve metrics on 127.0.0.1:{port}" in proc.output()


@pytest.mark.parametrize(
    ("argv", "slot", "want"),
    [
        (["--processes", "3", "--metrics-port", "9100"], 3, ["--metrics-port", "9102"]),
        (["--metrics-port=9100", "--processes=2"], 1, ["--metrics-port", "9100"]),
        (["--metrics-p", "9100"], 2, ["--metrics-port", "9101"]),
        (["--metrics-port", "0"], 2, ["--metrics-port", "0"]),
        (["--metrics-host", "0.0.0.0"], 2, ["--metrics-host", "0.0.0.0"]),
    ],
)
def test_each_supervised_child_gets_its_own_port(
    argv: list[str], slot: int, want: list[str]
) -> None:
    assert child_argv(argv, slot) == want


def test_an_agent_serves_metrics_and_leaves_its_attempts_to_the_api(
    db_url: str, tmp_path: Path
) -> None:
    """An agent (``--server``) with ``--metrics-port`` serves ``/metrics`` but counts none
    of its attempts: the API that records its reports counts each once, so summing both
    pages counts every attempt once."""
    with api_server(db_url, tmp_path, PGDAG_TOOLS="tests.testtools") as base:
        port = free_port()
        env = base_env(db_url, PGDAG_TOOLS="tests.testtools")
        del env["DATABASE_URL"]  # an agent reaches only the API
        agent = Proc(
            [
                "-m",
                "workers",
                *("--server", base, "--worker-id", "metrics-agent"),
                *("--agent-log", str(tmp_path / "agent.sqlite3")),
                *("--metrics-port", str(port)),
            ],
            env,
            tmp_path / "agent.log",
        )
        try:
            r = httpx.post(
                f"{base}/runs",
                json={
                    "steps": [
                        {"name": "retried", "tool": FAIL, "input": {"failTimes": 1}},
                        {"name": "echo", "tool": ECHO, "input": {}},
                    ]
                },
                timeout=30,
            )
            assert r.status_code == 201, r.text
            assert wait_run_finished(db_url, r.json()["id"]) == "completed", agent.output()
            api = wait_for(
                lambda: (
                    (s := scrape(f"{base}/metrics"))
                    and value(s, "pgdag_attempts_total", tool=ECHO, outcome="succeeded") == 1
                    and s
                ),
                what="the API's count of the agent's reports",
            )
            assert value(api, "pgdag_attempts_total", tool=FAIL, outcome="failed") == 1
            assert value(api, "pgdag_attempts_total", tool=FAIL, outcome="succeeded") == 1
            assert value(api, "pgdag_retries_total", tool=FAIL) == 1
            mine = scrape(f"http://127.0.0.1:{port}/metrics")
            assert ("pgdag_lease_expiries_total", frozenset()) in mine  # the page is served
            counted = {
                name: v
                for (name, _), v in mine.items()
                if name.startswith(("pgdag_attempts", "pgdag_retries", "pgdag_dead_letters"))
                or name.endswith("_count")
            }
            assert all(v == 0 for v in counted.values()), counted
        finally:
            agent.stop()


def two_free_ports() -> int:
    """A port P such that P and P + 1 are both free now (on 127.0.0.1)."""
    import socket

    def free(port: int) -> bool:
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                return False
            return True

    return wait_for(lambda: (p := free_port()) < 65535 and free(p + 1) and p, what="two free ports")


def test_supervised_children_serve_metrics_on_consecutive_ports(
    db_url: str, tmp_path: Path
) -> None:
    """``--processes 2 --metrics-port P``: slot 1 serves on P, slot 2 on P + 1."""
    port = two_free_ports()
    sup = Proc(
        ["-m", "workers", "--processes", "2", "--worker-id", "mp", "--metrics-port", str(port)],
        base_env(db_url),
        tmp_path / "supervisor.log",
    )
    try:

        def served(p: int) -> bool:
            if sup.popen.poll() is not None:
                raise AssertionError("supervisor exited:\n" + sup.output())
            try:
                return ("pgdag_lease_expiries_total", frozenset()) in scrape(
                    f"http://127.0.0.1:{p}/metrics"
                )
            except httpx.TransportError:
                return False

        for p in (port, port + 1):
            wait_for(lambda p=p: served(p), timeout_s=30, what=f"/metrics on port {p}")
    finally:
        assert sup.stop() == 0, sup.output()
