"""Child runs (steps of kind run, issue 15 part 4) on a real Postgres.

The in-process tests drive the engine's own operations (the maintenance leader's
`ChildRuns` pass, and a worker's claim / complete / fail through `Store`) step by step, so
each transition is seen in order; the end-to-end test runs the API (which leads maintenance)
and a worker process; the crash test SIGKILLs the leader while its transaction has inserted
the child but not yet marked the step. Every wait is on a condition with a deadline."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import psycopg

from chaos.checker import check_database
from engine.config import Settings
from engine.dag import parse_run
from engine.db import open_pool
from engine.maintenance import ChildRuns
from engine.store import Store
from engine.tools import load_tool_modules
from engine.transitions import CHILD_RUN_OWNER, output_json
from tests.support import (
    Proc,
    api_server,
    base_env,
    events,
    free_port,
    query,
    steps_by_name,
    wait_for,
    wait_run_finished,
    workers,
)
from tests.testtools import echo, emit

load_tool_modules(["workers.tools.builtin", "tests.testtools"])

TOOLS = {"PGDAG_TOOLS": "tests.testtools"}
SETTINGS = Settings(backoff_base_ms=1, backoff_cap_ms=2)


def child_template(*steps: dict[str, Any]) -> dict[str, Any]:
    return {"goal": "child", "steps": list(steps)}


def assert_checker_clean(db_url: str, *run_ids: str) -> None:
    with psycopg.connect(db_url) as conn:
        report = check_database(conn, list(run_ids))
    assert report.ok, report.violations


@asynccontextmanager
async def store_on(db_url: str) -> AsyncIterator[Store]:
    pool = await open_pool(db_url, min_size=1, max_size=2)
    try:
        yield Store(pool, lease_ttl_s=30)
    finally:
        await pool.close()


async def work(store: Store, tools: list[str]) -> int:
    """What a worker does, once: claim the ready steps of `tools`, run each through its
    tool and record the outcome; returns how many it ran."""
    from engine.tools import ToolContext, get_tool

    claimed = await store.claim("w-test", 10, tools=tools)
    for step in claimed:
        tool = get_tool(step.tool)
        ctx = ToolContext(
            run_id=step.run_id,
            step_name=step.name,
            attempt=step.attempt,
            idempotency_key=step.idempotency_key,
        )
        try:
            out = await tool.fn(tool.parse_input(step.input), ctx)
        except Exception as exc:
            await store.fail(
                step,
                error=str(exc),
                retryable=bool(getattr(exc, "retryable", True)),
                worker_id="w-test",
                backoff_base_ms=1,
                backoff_cap_ms=2,
            )
        else:
            await store.complete(step, output_json(out), worker_id="w-test")
    return len(claimed)


def children_of(db_url: str, run_id: str) -> list[dict[str, Any]]:
    return query(
        db_url,
        "SELECT * FROM runs WHERE parent_run_id = %(id)s ORDER BY created_at, id",
        {"id": run_id},
    )


def test_failed_child_fails_the_attempt_and_a_retry_starts_a_fresh_child(db_url: str) -> None:
    """A child that fails fails its parent step's attempt (retryable): the next attempt
    starts a new child; when attempts are spent the step is a dead letter and its run
    fails. A second pass with nothing due does nothing (no second child per attempt)."""
    body = {
        "goal": "parent",
        "steps": [
            {
                "name": "sub",
                "run": child_template(
                    {
                        "name": "boom",
                        "tool": "TEST_FAIL_TIMES",
                        "input": {"failTimes": 9, "retryable": False},
                    }
                ),
                "maxAttempts": 2,
            }
        ],
    }
    spec = parse_run(body, max_steps=100)

    async def go() -> str:
        async with store_on(db_url) as store:
            run_id, _ = await store.create_run(spec)
            task = ChildRuns(SETTINGS)
            for attempt in (1, 2):
                await wait_async(lambda: task.run_once(store), what=f"child {attempt} started")
                assert await task.run_once(store) == 0  # nothing more to do: no second child
                kids = children_of(db_url, run_id)
                assert len(kids) == attempt
                assert await work(store, ["TEST_FAIL_TIMES"]) == 1  # the child's step fails
                assert await task.run_once(store) == 1  # the parent's attempt fails
            return run_id

    run_id = asyncio.run(go())
    sub = steps_by_name(db_url, run_id)["sub"]
    assert sub["status"] == "dead_letter" and sub["attempt"] == 2
    kids = children_of(db_url, run_id)
    assert [k["status"] for k in kids] == ["failed", "failed"]
    assert sub["child_run_id"] == kids[1]["id"]
    assert sub["error"].startswith(f"child run {kids[1]['id']} failed: boom: planned failure")
    assert (
        query(db_url, "SELECT status FROM runs WHERE id = %(id)s", {"id": run_id})[0]["status"]
        == "failed"
    )
    evs = events(db_url, run_id)
    claims = [e for e in evs if e["event"] == "step_claimed"]
    assert [c["worker_id"] for c in claims] == [CHILD_RUN_OWNER] * 2
    assert [c["detail"]["childRunId"] for c in claims] == [str(k["id"]) for k in kids]
    kinds = [e["event"] for e in evs if e["step_name"] == "sub"]
    assert kinds == [
        "step_claimed",
        "step_retry_scheduled",
        "step_claimed",
        "step_dead_lettered",
    ]
    assert_checker_clean(db_url, run_id, *(str(k["id"]) for k in kids))


def test_a_child_refused_at_creation_dead_letters_the_step(db_url: str) -> None:
    """The input a $ref resolved is of the wrong type for the child's tool: no child is
    created, and the step's attempt fails (not retryable) with the problems named."""
    body = {
        "steps": [
            emit("plan", {"ms": "soon"}),
            {
                "name": "sub",
                "dependsOn": ["plan"],
                "input": {"ms": {"$ref": "steps.plan.output.ms"}},
                "run": child_template(
                    {"name": "wait", "tool": "DELAY", "input": {"ms": {"$param": "ms"}}}
                ),
                "maxAttempts": 3,
            },
        ]
    }
    spec = parse_run(body, max_steps=100)

    async def go() -> str:
        async with store_on(db_url) as store:
            run_id, _ = await store.create_run(spec)
            assert await work(store, ["TEST_EMIT"]) == 1
            assert await ChildRuns(SETTINGS).run_once(store) == 1
            return run_id

    run_id = asyncio.run(go())
    sub = steps_by_name(db_url, run_id)["sub"]
    assert sub["status"] == "dead_letter" and sub["child_run_id"] is None
    assert sub["error"].startswith("child run refused: step wait: input.ms:"), sub["error"]
    assert children_of(db_url, run_id) == []
    assert_checker_clean(db_url, run_id)


def test_an_unresolvable_ref_or_an_unstorable_output_dead_letters_the_step(db_url: str) -> None:
    """The run step's $ref names a key its dependency's output lacks: no child, the step's
    attempt fails (not retryable) with the resolution error. A child whose outputs exceed
    PGDAG_MAX_OUTPUT_BYTES: the step fails (not retryable) saying so."""
    missing = parse_run(
        {
            "steps": [
                emit("plan", {"other": 1}),
                {
                    "name": "sub",
                    "dependsOn": ["plan"],
                    "input": {"ms": {"$ref": "steps.plan.output.ms"}},
                    "run": child_template(emit("x", 1)),
                },
            ]
        },
        max_steps=100,
    )
    big = parse_run(
        {"steps": [{"name": "sub", "run": child_template(emit("x", "y" * 500))}]}, max_steps=100
    )
    task = ChildRuns(Settings(backoff_base_ms=1, backoff_cap_ms=2, max_output_bytes=200))

    async def go() -> tuple[str, str]:
        async with store_on(db_url) as store:
            run1, _ = await store.create_run(missing)
            run2, _ = await store.create_run(big)
            assert await work(store, ["TEST_EMIT"]) == 1  # plan
            assert await task.run_once(store) == 2  # run1's sub refused, run2's child started
            assert await work(store, ["TEST_EMIT"]) == 1  # run2's child step
            assert await task.run_once(store) == 1  # run2's sub fails on its output
            return run1, run2

    run1, run2 = asyncio.run(go())
    sub1 = steps_by_name(db_url, run1)["sub"]
    assert sub1["status"] == "dead_letter" and sub1["child_run_id"] is None
    assert "input.ms: $ref steps.plan.output.ms cannot be resolved" in sub1["error"], sub1["error"]
    sub2 = steps_by_name(db_url, run2)["sub"]
    child = children_of(db_url, run2)[0]
    assert sub2["status"] == "dead_letter" and child["status"] == "completed"
    assert sub2["error"].startswith(f"child run {child['id']} completed, but its outputs cannot")
    assert_checker_clean(db_url, run1, run2)


def test_cancelling_the_child_dead_letters_the_parent_step(db_url: str) -> None:
    """A person cancels the child: the parent step's attempt fails, not retried (a dead
    letter, for a person to retry), and its run fails."""
    body = {"steps": [{"name": "sub", "run": child_template(emit("x", 1)), "maxAttempts": 5}]}
    spec = parse_run(body, max_steps=100)

    async def go() -> tuple[str, str]:
        async with store_on(db_url) as store:
            run_id, _ = await store.create_run(spec)
            task = ChildRuns(SETTINGS)
            assert await task.run_once(store) == 1
            child = str(children_of(db_url, run_id)[0]["id"])
            await store.cancel_run(child, reason="not needed")
            assert await task.run_once(store) == 1
            return run_id, child

    run_id, child = asyncio.run(go())
    sub = steps_by_name(db_url, run_id)["sub"]
    assert (sub["status"], sub["attempt"]) == ("dead_letter", 1)
    assert sub["error"] == f"child run {child} was cancelled"
    assert (
        query(db_url, "SELECT status FROM runs WHERE id = %(id)s", {"id": run_id})[0]["status"]
        == "failed"
    )
    assert_checker_clean(db_url, run_id, child)


async def wait_async(fn: Any, *, what: str, timeout_s: float = 10) -> Any:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while loop.time() < deadline:
        got = await fn()
        if got:
            return got
        await asyncio.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


def test_child_run_end_to_end_outputs_links_cancel_and_refusals(
    db_url: str, tmp_path: Path
) -> None:
    """Through the API with a worker process: a step of kind run whose input holds a $ref
    starts a child whose step reads it through $param; the parent step succeeds with the
    child's outputs, which a downstream step reads through $ref; GET /runs/{id} links the
    two both ways. Cancelling a parent cancels its running child, audited. A bad template is
    refused with 422 naming the field under run., and nothing is written."""
    parent = {
        "goal": "research",
        "steps": [
            emit("plan", {"topic": "tides", "n": 3}),
            {
                "name": "sub",
                "dependsOn": ["plan"],
                "input": {"topic": {"$ref": "steps.plan.output.topic"}},
                "run": child_template(
                    echo("fetch", {"about": {"$param": "topic"}}),
                    echo("summarize", {"text": {"$ref": "steps.fetch.output.got.about"}}, "fetch"),
                ),
            },
            echo(
                "use", {"summary": {"$ref": "steps.sub.output.outputs.summarize.got.text"}}, "sub"
            ),
        ],
    }
    with (
        api_server(db_url, tmp_path, **TOOLS) as base,
        workers(db_url, tmp_path, 1, **TOOLS),
        httpx.Client(base_url=base, timeout=10) as http,
    ):
        # A bad template: 422 naming the fields, nothing written.
        bad = {
            "steps": [
                {
                    "name": "sub",
                    "input": {"topic": "x"},
                    "run": {
                        "steps": [
                            {"name": "a", "tool": "NO_SUCH_TOOL"},
                            {
                                "name": "b",
                                "tool": "TEST_EMIT",
                                "input": {"value": {"$param": "nope"}},
                            },
                            {"name": "c", "run": {"steps": [emit("d", 1)]}},
                        ]
                    },
                }
            ]
        }
        before = query(db_url, "SELECT count(*) AS n FROM runs")[0]["n"]
        r = http.post("/runs", json=bad)
        assert r.status_code == 422, r.text
        problems = {(p["step"], p["field"]) for p in r.json()["problems"]}
        assert problems == {
            ("sub", "run.steps.a.tool"),
            ("sub", "run.steps.b.input.value"),
            ("sub", "run.steps.c.run"),
        }, r.text
        assert query(db_url, "SELECT count(*) AS n FROM runs")[0]["n"] == before

        r = http.post("/runs", json=parent)
        assert r.status_code == 201, r.text
        run_id = r.json()["id"]
        assert wait_run_finished(db_url, run_id, timeout_s=30) == "completed"
        run = http.get(f"/runs/{run_id}").json()
        steps = {s["name"]: s for s in run["steps"]}
        child_id = steps["sub"]["childRunId"]
        assert child_id is not None and steps["sub"]["tool"] == "$run"
        assert steps["sub"]["output"]["runId"] == child_id
        assert steps["sub"]["output"]["outputs"]["fetch"]["got"] == {"about": "tides"}
        assert steps["use"]["output"]["got"] == {"summary": "tides"}
        assert run["parentRunId"] is None and run["parentStepName"] is None
        child = http.get(f"/runs/{child_id}").json()
        assert child["status"] == "completed"
        assert (child["parentRunId"], child["parentStepName"]) == (run_id, "sub")
        assert child["goal"] == "child"

        # Cancel a parent whose child is running: the child is cancelled with it.
        blocking = {
            "steps": [
                {
                    "name": "sub",
                    "run": child_template(
                        {
                            "name": "wait",
                            "tool": "DELAY",
                            "input": {"ms": 60_000},
                        }
                    ),
                }
            ]
        }
        r = http.post("/runs", json=blocking)
        assert r.status_code == 201, r.text
        run2 = r.json()["id"]
        waiting = wait_for(
            lambda: (
                (s := http.get(f"/runs/{run2}").json()["steps"][0])["status"] == "running" and s
            ),
            what="the child started",
        )
        assert waiting["waitingFor"]["reason"] == "childRun"
        child2 = waiting["waitingFor"]["runId"]
        assert waiting["leaseOwner"] == CHILD_RUN_OWNER
        r = http.post(f"/runs/{run2}/cancel", json={})
        assert r.status_code == 200, r.text
    assert (
        query(db_url, "SELECT status FROM runs WHERE id = %(id)s", {"id": child2})[0]["status"]
        == "cancelled"
    )
    cancelled = [e for e in events(db_url, child2) if e["event"] == "run_cancelled"]
    assert len(cancelled) == 1
    assert cancelled[0]["detail"]["reason"].startswith(f"parent run {run2} cancelled")
    assert steps_by_name(db_url, run2)["sub"]["status"] == "cancelled"
    assert_checker_clean(db_url, run_id, child_id, run2, child2)


def start_api(db_url: str, tmp_path: Path, name: str) -> tuple[Proc, str]:
    port = free_port()
    proc = Proc(
        ["-m", "engine", "serve", "--port", str(port)],
        base_env(db_url, PGDAG_MAINTENANCE_STANDBY_S="0.2", **TOOLS),
        tmp_path / f"{name}.log",
    )
    base = f"http://127.0.0.1:{port}"

    def healthy() -> bool:
        if proc.popen.poll() is not None:
            raise AssertionError("API exited:\n" + proc.output())
        try:
            return httpx.get(f"{base}/health", timeout=1).status_code == 200
        except httpx.TransportError:
            return False

    wait_for(healthy, timeout_s=30, what="API health")
    return proc, base


def test_leader_killed_between_creating_the_child_and_marking_the_step(
    db_url: str, tmp_path: Path
) -> None:
    """The leader (the API process) is SIGKILLed while its transaction has inserted the
    child run but not yet claimed the step (held there by a lock on the parent run row,
    which linking the child needs): nothing of it remains; the next leader starts exactly
    one child, and the parent completes with its output."""
    body = {"steps": [{"name": "sub", "run": child_template(emit("only", {"x": 1}))}]}
    spec = parse_run(body, max_steps=100)

    async def create() -> str:
        async with store_on(db_url) as store:
            run_id, _ = await store.create_run(spec)
            return run_id

    run_id = asyncio.run(create())
    with psycopg.connect(db_url) as blocker:
        blocker.execute("SELECT 1 FROM runs WHERE id = %(id)s FOR UPDATE", {"id": run_id})
        leader, _ = start_api(db_url, tmp_path, "api-1")
        try:
            stuck = wait_for(
                lambda: query(
                    db_url,
                    "SELECT pid FROM pg_stat_activity WHERE wait_event_type = 'Lock'"
                    " AND query LIKE '%%parent_run_id%%' AND pid <> pg_backend_pid()",
                ),
                what="the leader's link of the child, waiting on the parent run's lock",
            )
            # Inserted, not committed: a child run row exists only inside that transaction.
            leader.signal(signal.SIGKILL)
            leader.popen.wait(timeout=10)
        finally:
            leader.kill()
            leader.stop()  # (closes its log)
        blocker.rollback()
    wait_for(
        lambda: (
            not query(
                db_url,
                "SELECT 1 FROM pg_stat_activity WHERE pid = %(pid)s",
                {"pid": stuck[0]["pid"]},
            )
        ),
        what="the dead leader's backend to end",
    )
    assert children_of(db_url, run_id) == []
    assert (
        query(
            db_url,
            "SELECT count(*) AS n FROM runs WHERE idempotency_key LIKE %(k)s",
            {"k": f"pgdag-child:{run_id}:%"},
        )[0]["n"]
        == 0
    )
    sub = steps_by_name(db_url, run_id)["sub"]
    assert (sub["status"], sub["attempt"], sub["child_run_id"]) == ("ready", 0, None)

    proc, _ = start_api(db_url, tmp_path, "api-2")
    try:
        wait_for(
            lambda: steps_by_name(db_url, run_id)["sub"]["status"] == "running",
            what="the new leader started the child",
        )

        async def run_child() -> None:
            async with store_on(db_url) as store:
                await wait_async(lambda: work(store, ["TEST_EMIT"]), what="the child's step")

        asyncio.run(run_child())
        assert wait_run_finished(db_url, run_id, timeout_s=20) == "completed"
    finally:
        proc.kill()  # nothing left to finish gracefully
        proc.stop()
    kids = children_of(db_url, run_id)
    assert len(kids) == 1 and kids[0]["status"] == "completed"
    sub = steps_by_name(db_url, run_id)["sub"]
    assert sub["attempt"] == 1 and sub["child_run_id"] == kids[0]["id"]
    assert sub["output"] == {"runId": str(kids[0]["id"]), "outputs": {"only": {"x": 1}}}
    assert_checker_clean(db_url, run_id, str(kids[0]["id"]))
