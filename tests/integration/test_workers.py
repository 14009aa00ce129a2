"""Real worker processes on a real Postgres: DAG order, races, crashes, zombies, retries."""

from __future__ import annotations

import collections
import signal
from pathlib import Path
from typing import Any

from tests.support import (
    events,
    query,
    steps_by_name,
    submit,
    wait_for,
    wait_run_finished,
    workers,
)

TEST_TOOLS = {"PGDAG_TOOLS": "tests.testtools"}


def delay(name: str, ms: int = 0, *deps: str, **extra: Any) -> dict[str, Any]:
    return {"name": name, "tool": "DELAY", "input": {"ms": ms}, "dependsOn": list(deps), **extra}


def assert_dependencies_respected(
    evs: list[dict[str, Any]], steps: dict[str, dict[str, Any]]
) -> None:
    """Every claim of a step comes after the success of each of its dependencies."""
    succeeded_at = {e["step_name"]: e["id"] for e in evs if e["event"] == "step_succeeded"}
    for e in evs:
        if e["event"] != "step_claimed":
            continue
        for dep in steps[e["step_name"]]["depends_on"]:
            assert dep in succeeded_at and succeeded_at[dep] < e["id"], (e["step_name"], dep)


def test_diamond_runs_in_dependency_order(db_url: str, tmp_path: Path) -> None:
    run_id = submit(
        db_url,
        {
            "steps": [
                delay("a", 50),
                delay("b", 50, "a"),
                delay("c", 80, "a"),
                delay("d", 0, "b", "c"),
            ]
        },
    )
    with workers(db_url, tmp_path, n=2):
        assert wait_run_finished(db_url, run_id) == "completed"
    evs = events(db_url, run_id)
    steps = steps_by_name(db_url, run_id)
    assert_dependencies_respected(evs, steps)
    order = [e["step_name"] for e in evs if e["event"] == "step_succeeded"]
    assert order[0] == "a" and order[-1] == "d" and set(order[1:3]) == {"b", "c"}
    assert all(s["status"] == "succeeded" and s["output"]["ok"] for s in steps.values())
    assert [e["event"] for e in evs][-1] == "run_completed"


def test_fan_out_fan_in_200(db_url: str, tmp_path: Path) -> None:
    body = {
        "steps": [delay("root")]
        + [delay(f"leaf{i}", 0, "root") for i in range(200)]
        + [delay("join", 0, *[f"leaf{i}" for i in range(200)])]
    }
    run_id = submit(db_url, body)
    with workers(db_url, tmp_path, n=2, concurrency=8):
        assert wait_run_finished(db_url, run_id) == "completed"
    evs = events(db_url, run_id)
    steps = steps_by_name(db_url, run_id)
    assert_dependencies_respected(evs, steps)
    join_claims = [e for e in evs if e["event"] == "step_claimed" and e["step_name"] == "join"]
    assert len(join_claims) == 1
    last_leaf = max(
        e["id"]
        for e in evs
        if e["event"] == "step_succeeded" and e["step_name"] != "join" and e["step_name"] != "root"
    )
    assert join_claims[0]["id"] > last_leaf


def test_four_workers_never_claim_a_step_twice(db_url: str, tmp_path: Path) -> None:
    run_id = submit(db_url, {"steps": [delay(f"s{i}") for i in range(2000)]})
    with workers(db_url, tmp_path, n=4, concurrency=8):
        assert wait_run_finished(db_url, run_id, timeout_s=120) == "completed"
    claims = collections.Counter(
        e["step_name"] for e in events(db_url, run_id) if e["event"] == "step_claimed"
    )
    assert len(claims) == 2000
    assert max(claims.values()) == 1
    by_worker = collections.Counter(
        e["worker_id"] for e in events(db_url, run_id) if e["event"] == "step_claimed"
    )
    assert len(by_worker) == 4, by_worker  # all four really raced


def _wait_running(db_url: str, run_id: str, name: str) -> dict[str, Any]:
    return wait_for(
        lambda: (s := steps_by_name(db_url, run_id)[name])["status"] == "running" and s,
        what=f"{name} to be running",
    )


def test_sigkilled_worker_step_recovered_after_lease_expiry(db_url: str, tmp_path: Path) -> None:
    run_id = submit(db_url, {"steps": [delay("slow", 1500), delay("after", 0, "slow")]})
    with workers(db_url, tmp_path, n=1, id_prefix="a") as [a]:
        running = _wait_running(db_url, run_id, "slow")
        assert running["lease_owner"] == "a0"
        a.kill()
    with workers(db_url, tmp_path, n=1, id_prefix="b"):
        assert wait_run_finished(db_url, run_id) == "completed"
    evs = [e for e in events(db_url, run_id) if e["step_name"] == "slow"]
    kinds = [e["event"] for e in evs]
    assert kinds == ["step_claimed", "step_lease_expired", "step_claimed", "step_succeeded"]
    assert evs[0]["lease_token"] < evs[2]["lease_token"]  # a fresh fencing token
    assert evs[3]["lease_token"] == evs[2]["lease_token"]
    assert steps_by_name(db_url, run_id)["slow"]["attempt"] == 2


def test_zombie_cannot_record_after_lease_expired(db_url: str, tmp_path: Path) -> None:
    """SIGSTOP a worker mid-step past its lease; another worker finishes the step; the
    zombie, resumed, can neither heartbeat nor record its result."""
    run_id = submit(db_url, {"steps": [delay("slow", 2500)]})
    with workers(db_url, tmp_path, n=1, id_prefix="zombie") as [zombie]:
        _wait_running(db_url, run_id, "slow")
        zombie.signal(signal.SIGSTOP)
        with workers(db_url, tmp_path, n=1, id_prefix="b"):
            # Wait for b0's claim, not only the expiry: a zombie resumed while the
            # step sits ready may claim it anew, legitimately, with a fresh token.
            wait_for(
                lambda: any(
                    e["event"] == "step_claimed" and e["worker_id"] == "b0"
                    for e in events(db_url, run_id)
                ),
                what="lease expiry and b0's claim",
            )
            zombie.signal(signal.SIGCONT)
            assert wait_run_finished(db_url, run_id) == "completed"
            wait_for(
                lambda: "lease lost" in zombie.output() or "refused" in zombie.output(),
                what="the zombie to notice it lost its lease",
            )
    evs = [e for e in events(db_url, run_id) if e["step_name"] == "slow"]
    successes = [e for e in evs if e["event"] == "step_succeeded"]
    assert len(successes) == 1
    first_claim = next(e for e in evs if e["event"] == "step_claimed")
    assert successes[0]["lease_token"] != first_claim["lease_token"]
    assert successes[0]["worker_id"] == "b0" and first_claim["worker_id"] == "zombie0"
    assert "lease" in zombie.output()


def test_non_idempotent_step_of_dead_worker_is_not_rerun(db_url: str, tmp_path: Path) -> None:
    run_id = submit(
        db_url, {"steps": [delay("charge", 3000, idempotent=False), delay("after", 0, "charge")]}
    )
    with workers(db_url, tmp_path, n=1) as [a]:
        _wait_running(db_url, run_id, "charge")
        a.kill()
    with workers(db_url, tmp_path, n=1, id_prefix="b"):
        assert wait_run_finished(db_url, run_id) == "failed"
    steps = steps_by_name(db_url, run_id)
    assert steps["charge"]["status"] == "dead_letter"
    assert '"idempotent": false' in steps["charge"]["error"]
    assert steps["after"]["status"] == "skipped"
    claims = [e for e in events(db_url, run_id) if e["event"] == "step_claimed"]
    assert [c["step_name"] for c in claims] == ["charge"]  # never run again


def test_backoff_ceilings_double_and_delays_grow(db_url: str, tmp_path: Path) -> None:
    body = {
        "steps": [
            {
                "name": f"f{i}",
                "tool": "TEST_FAIL_TIMES",
                "input": {"failTimes": 3},
                "maxAttempts": 4,
            }
            for i in range(30)
        ]
    }
    _load_test_tools()
    run_id = submit(db_url, body)
    with workers(
        db_url,
        tmp_path,
        n=2,
        concurrency=16,
        PGDAG_BACKOFF_BASE_MS="40",
        PGDAG_BACKOFF_CAP_MS="10000",
        **TEST_TOOLS,
    ):
        assert wait_run_finished(db_url, run_id) == "completed"
    retries = [e for e in events(db_url, run_id) if e["event"] == "step_retry_scheduled"]
    assert len(retries) == 90
    by_attempt: dict[int, list[float]] = collections.defaultdict(list)
    for e in retries:
        detail = e["detail"]
        assert detail["backoffCeilingMs"] == 40 * 2 ** (e["attempt"] - 1)
        assert 0 <= detail["backoffMs"] <= detail["backoffCeilingMs"]
        by_attempt[e["attempt"]].append(detail["backoffMs"])
    means = [sum(v) / len(v) for _, v in sorted(by_attempt.items())]
    assert means[0] < means[1] < means[2], means


def test_dead_letter_after_max_attempts_then_manual_retry(db_url: str, tmp_path: Path) -> None:
    _load_test_tools()
    fixed = tmp_path / "cause-fixed"
    flaky = {"name": "flaky", "tool": "TEST_FAIL_UNTIL_FILE", "input": {"path": str(fixed)}}
    run_id = submit(db_url, {"steps": [{**flaky, "maxAttempts": 2}, delay("after", 0, "flaky")]})
    with workers(db_url, tmp_path, n=1, **TEST_TOOLS):
        assert wait_run_finished(db_url, run_id) == "failed"
        steps = steps_by_name(db_url, run_id)
        assert steps["flaky"]["status"] == "dead_letter" and steps["flaky"]["attempt"] == 2
        assert "does not exist yet" in steps["flaky"]["error"]
        assert steps["after"]["status"] == "skipped"
        fixed.touch()  # a person fixes the cause, then retries by hand
        _retry(db_url, run_id, "flaky")
        assert wait_run_finished(db_url, run_id) == "completed"
    steps = steps_by_name(db_url, run_id)
    assert steps["flaky"]["attempt"] == 1  # attempts were reset by the retry
    kinds = [e["event"] for e in events(db_url, run_id)]
    assert kinds.count("step_dead_lettered") == 1
    assert "step_retried" in kinds and "step_unskipped" in kinds and "run_resumed" in kinds
    assert kinds[-1] == "run_completed"


def test_output_jsonb_refuses_fails_the_step_cleanly(db_url: str, tmp_path: Path) -> None:
    _load_test_tools()
    run_id = submit(
        db_url,
        {
            "steps": [
                {"name": "nul", "tool": "TEST_NUL_OUTPUT", "input": {}},
                {"name": "deep", "tool": "TEST_DEEP_OUTPUT", "input": {}},
                delay("fine"),
            ]
        },
    )
    with workers(db_url, tmp_path, n=1, **TEST_TOOLS) as [w]:
        assert wait_run_finished(db_url, run_id) == "failed"
        assert w.popen.poll() is None  # the worker lives
    steps = steps_by_name(db_url, run_id)
    assert steps["nul"]["status"] == "dead_letter" and "NUL" in steps["nul"]["error"]
    assert steps["deep"]["status"] == "dead_letter" and "nested" in steps["deep"]["error"]
    assert steps["nul"]["attempt"] == 1  # not retryable: no second attempt
    assert steps["fine"]["status"] == "succeeded"


def test_step_timeout_fails_the_attempt(db_url: str, tmp_path: Path) -> None:
    run_id = submit(db_url, {"steps": [delay("slow", 5000, timeoutMs=100, maxAttempts=2)]})
    with workers(db_url, tmp_path, n=1):
        assert wait_run_finished(db_url, run_id) == "failed"
    step = steps_by_name(db_url, run_id)["slow"]
    assert step["attempt"] == 2 and "timed out after 100 ms" in step["error"]


def test_sigterm_lets_inflight_finish_then_releases_the_rest(db_url: str, tmp_path: Path) -> None:
    run_id = submit(db_url, {"steps": [delay("quick", 300), delay("long", 20_000)]})
    with workers(db_url, tmp_path, n=1, PGDAG_SHUTDOWN_GRACE="1") as [w]:
        _wait_running(db_url, run_id, "long")
        wait_for(
            lambda: steps_by_name(db_url, run_id)["quick"]["status"] in ("running", "succeeded")
        )
        w.signal(signal.SIGTERM)
        assert w.popen.wait(timeout=15) == 0
    steps = steps_by_name(db_url, run_id)
    assert steps["quick"]["status"] == "succeeded"
    assert steps["long"]["status"] == "ready"  # released at once, not left for the reaper
    assert steps["long"]["attempt"] == 0  # the attempt is handed back unspent
    kinds = [e["event"] for e in events(db_url, run_id) if e["step_name"] == "long"]
    assert kinds == ["step_claimed", "step_released"]
    worker = query(db_url, "SELECT status FROM workers WHERE id = 'w0'")[0]
    assert worker["status"] == "stopped"


def test_cancel_running_run(db_url: str, tmp_path: Path) -> None:
    run_id = submit(db_url, {"steps": [delay("long", 20_000), delay("next", 0, "long")]})
    with workers(db_url, tmp_path, n=1) as [w]:
        _wait_running(db_url, run_id, "long")
        _cancel(db_url, run_id)
        # the worker's heartbeat finds the lease gone and abandons the attempt
        wait_for(lambda: "lease lost" in w.output(), what="worker to abandon the cancelled step")
    steps = steps_by_name(db_url, run_id)
    assert {s["status"] for s in steps.values()} == {"cancelled"}
    kinds = [e["event"] for e in events(db_url, run_id)]
    assert kinds.count("step_succeeded") == 0 and kinds[-1] == "run_cancelled"


# --- helpers ---------------------------------------------------------------------------


def _load_test_tools() -> None:
    from engine.tools import load_tool_modules

    load_tool_modules(["tests.testtools"])


def _store_call(db_url: str, method: str, *args: Any) -> Any:
    import asyncio

    from engine.db import open_pool
    from engine.store import Store

    async def go() -> Any:
        pool = await open_pool(db_url, min_size=1, max_size=1)
        try:
            return await getattr(Store(pool, lease_ttl_s=2), method)(*args)
        finally:
            await pool.close()

    return asyncio.run(go())


def _retry(db_url: str, run_id: str, step: str) -> None:
    _store_call(db_url, "retry_step", run_id, step)


def _cancel(db_url: str, run_id: str) -> None:
    _store_call(db_url, "cancel_run", run_id)
