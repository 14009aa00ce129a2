"""The state machine through the engine's own API, in-process, on a real Postgres."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from engine.config import Settings
from engine.dag import parse_run
from engine.db import open_pool
from engine.errors import LeaseLost
from engine.store import Store
from engine.tools import load_tool_modules
from engine.transitions import ClaimedStep
from tests.support import events, query, steps_by_name
from workers.database import DatabaseBackend
from workers.worker import Worker

load_tool_modules(["workers.tools.builtin"])


def delay(name: str, *deps: str, **extra: Any) -> dict[str, Any]:
    return {"name": name, "tool": "DELAY", "input": {"ms": 0}, "dependsOn": list(deps), **extra}


async def create(store: Store, *steps: dict[str, Any]) -> str:
    run_id, _ = await store.create_run(parse_run({"steps": list(steps)}, max_steps=100))
    return run_id


async def claim_one(store: Store, name: str, worker: str = "w") -> ClaimedStep:
    claimed = await store.claim(worker, 10)
    by_name = {c.name: c for c in claimed}
    assert name in by_name, [c.name for c in claimed]
    return by_name[name]


def run(coro: Any) -> Any:
    return asyncio.run(coro)


def test_fan_in_counted_while_a_child_is_skipped(db_url: str) -> None:
    """A -> C <- B: A dead-letters (C skipped), B succeeds, A is retried and succeeds:
    C must become ready (regression: B's success was not counted while C was skipped)."""

    async def go() -> None:
        pool = await open_pool(db_url, min_size=1, max_size=2)
        store = Store(pool, lease_ttl_s=30)
        try:
            run_id = await create(
                store, delay("a", maxAttempts=1), delay("b"), delay("c", "a", "b")
            )
            claimed = {c.name: c for c in await store.claim("w", 10)}
            await store.fail(
                claimed["a"],
                error="boom",
                retryable=True,
                worker_id="w",
                backoff_base_ms=1,
                backoff_cap_ms=1,
            )
            await store.complete(claimed["b"], "{}", worker_id="w")
            assert (await store.get_run(run_id))["status"] == "failed"
            await store.retry_step(run_id, "a")
            await store.complete(await claim_one(store, "a"), "{}", worker_id="w")
            await store.complete(await claim_one(store, "c"), "{}", worker_id="w")
            assert (await store.get_run(run_id))["status"] == "completed"
        finally:
            await pool.close()

    run(go())


def test_stale_tokens_are_refused_everywhere(db_url: str) -> None:
    async def go() -> None:
        pool = await open_pool(db_url, min_size=1, max_size=2)
        store = Store(pool, lease_ttl_s=30)
        try:
            run_id = await create(store, delay("a"))
            first = await claim_one(store, "a")
            await store.release([(first.id, first.lease_token)], worker_id="w")
            second = await claim_one(store, "a")
            assert second.lease_token > first.lease_token
            with pytest.raises(LeaseLost, match="stale"):
                await store.complete(first, '{"zombie": true}', worker_id="w")
            with pytest.raises(LeaseLost):
                await store.fail(
                    first,
                    error="zombie",
                    retryable=True,
                    worker_id="w",
                    backoff_base_ms=1,
                    backoff_cap_ms=1,
                )
            assert await store.heartbeat([(first.id, first.lease_token)]) == set()
            assert await store.heartbeat([(second.id, second.lease_token)]) == {second.id}
            await store.complete(second, '{"ok": true}', worker_id="w")
            # an ambiguous commit retried: the same write again is a no-op, not an error
            await store.complete(second, '{"ok": true}', worker_id="w")
            step = steps_by_name(db_url, run_id)["a"]
            assert step["status"] == "succeeded" and step["output"] == {"ok": True}
            kinds = [e["event"] for e in events(db_url, run_id) if e["step_name"] == "a"]
            assert kinds.count("step_succeeded") == 1
        finally:
            await pool.close()

    run(go())


def test_reclaimed_step_stops_the_older_attempt(db_url: str) -> None:
    """A worker that re-claims a step whose earlier attempt it still runs (its lease expired
    while heartbeats failed) cancels the old attempt and keeps tracking the new one
    (regression: the old attempt's end untracked the new one)."""

    async def go() -> None:
        pool = await open_pool(db_url, min_size=1, max_size=4)
        store = Store(pool, lease_ttl_s=30)
        try:
            await create(store, {"name": "slow", "tool": "DELAY", "input": {"ms": 60_000}})
            settings = Settings(database_url=db_url)
            worker = Worker(
                DatabaseBackend(store, settings, database_url=db_url, worker_id="w"),
                settings,
                concurrency=2,
            )
            old = await claim_one(store, "slow")
            worker._start_attempt(old)
            old_task = worker._attempts[old.id].task
            assert old_task is not None
            await store.release([(old.id, old.lease_token)], worker_id="w")  # lease gone
            new = await claim_one(store, "slow")
            worker._start_attempt(new)
            # the old attempt is cancelled; the new one is tracked and keeps running
            # a 60 s DELAY that ends within 5 s was stopped; a lost lease ends it quietly
            await asyncio.wait_for(asyncio.gather(old_task, return_exceptions=True), 5)
            assert worker.stats.leases_lost == 1
            assert worker._attempts[new.id].step.lease_token == new.lease_token
            new_task = worker._attempts[new.id].task
            assert new_task is not None and not new_task.done()
            new_task.cancel()
            await asyncio.gather(new_task, return_exceptions=True)
        finally:
            await pool.close()

    run(go())


def test_batch_of_successes_records_live_leases_and_names_the_lost(db_url: str) -> None:
    """One `complete_steps` statement for several attempts: current tokens are recorded
    (a fan-in child promoted once, the run settled), a stale token is refused by name, and
    writing the same batch again (an ambiguous commit retried) changes nothing."""

    async def go() -> None:
        pool = await open_pool(db_url, min_size=1, max_size=2)
        store = Store(pool, lease_ttl_s=30)
        try:
            run_id = await create(
                store, delay("a"), delay("b"), delay("c"), delay("join", "a", "b", "c")
            )
            claimed = {c.name: c for c in await store.claim("w", 10)}
            assert set(claimed) == {"a", "b", "c"}
            stale = claimed["c"]
            await store.release([(stale.id, stale.lease_token)], worker_id="w")
            batch = [(claimed[n].id, claimed[n].lease_token, f'{{"n": "{n}"}}') for n in "abc"]
            outcome = await store.complete_many(batch, worker_id="w")
            assert outcome[claimed["a"].id] is None and outcome[claimed["b"].id] is None
            lost = str(outcome[stale.id])
            assert "stale" in lost or "ended" in lost
            again = await store.complete_many(batch[:2], worker_id="w")
            assert again == {claimed["a"].id: None, claimed["b"].id: None}
            steps = steps_by_name(db_url, run_id)
            assert steps["join"]["status"] == "pending" and steps["join"]["deps_remaining"] == 1
            c = await claim_one(store, "c")
            assert await store.complete_many([(c.id, c.lease_token, "{}")], worker_id="w") == {
                c.id: None
            }
            assert steps_by_name(db_url, run_id)["join"]["status"] == "ready"
            kinds = [e["event"] for e in events(db_url, run_id)]
            assert kinds.count("step_succeeded") == 3 and kinds.count("step_ready") == 1
        finally:
            await pool.close()

    run(go())


def test_pruner_deletes_only_runs_finished_past_retention(db_url: str) -> None:
    """Retention: a run finished 2 days ago goes with its steps and edges (its audit rows go
    with their day's partition: test_audit_partitions.py); a run finished now and an
    unfinished run stay."""

    async def go() -> None:
        pool = await open_pool(db_url, min_size=1, max_size=2)
        store = Store(pool, lease_ttl_s=30)
        try:
            old = await create(store, delay("a"), delay("b", "a"))
            for name in ("a", "b"):
                step = await claim_one(store, name)
                await store.complete(step, "{}", worker_id="w")
            recent = await create(store, {"name": "x", "tool": "DELAY", "input": {"ms": 0}})
            await store.complete(await claim_one(store, "x"), "{}", worker_id="w")
            unfinished = await create(store, delay("y"))
            query(
                db_url,
                "UPDATE runs SET finished_at = now() - interval '2 days' WHERE id = %(id)s",
                {"id": old},
            )
            assert await store.prune(retention_s=86400) == 1
            assert await store.prune(retention_s=86400) == 0
            left = {r["id"] for r in query(db_url, "SELECT id::text FROM runs")}
            assert left == {recent, unfinished}
            rows = query(
                db_url, "SELECT count(*) AS n FROM steps WHERE run_id = %(id)s", {"id": old}
            )
            assert rows[0]["n"] == 0
            assert len(events(db_url, old)) > 0  # not deleted with the run (migration 0007)
            assert query(db_url, "SELECT count(*) AS n FROM step_edges")[0]["n"] == 0
            assert len(events(db_url, recent)) > 0
        finally:
            await pool.close()

    run(go())


def test_cancel_names_a_lease_token_only_for_the_attempt_it_ends(db_url: str) -> None:
    """A step waiting out a retry (ready, its last attempt ended by step_failed) is cancelled
    with no token: the token belongs to the attempt that already ended. A running step's
    cancel carries its open attempt's token."""

    async def go() -> str:
        pool = await open_pool(db_url, min_size=1, max_size=2)
        store = Store(pool, lease_ttl_s=30)
        try:
            run_id = await create(store, delay("waits", maxAttempts=3), delay("runs"))
            claimed = {c.name: c for c in await store.claim("w", 10)}
            await store.fail(
                claimed["waits"],
                error="boom",
                retryable=True,
                worker_id="w",
                backoff_base_ms=60_000,
                backoff_cap_ms=60_000,
            )
            assert await store.cancel_run(run_id) == 2
            return run_id
        finally:
            await pool.close()

    run_id = run(go())
    cancelled = {
        e["step_name"]: e for e in events(db_url, run_id) if e["event"] == "step_cancelled"
    }
    claims = {e["step_name"]: e for e in events(db_url, run_id) if e["event"] == "step_claimed"}
    assert cancelled["waits"]["from_status"] == "ready"
    assert cancelled["waits"]["lease_token"] is None
    assert cancelled["runs"]["from_status"] == "running"
    assert cancelled["runs"]["lease_token"] == claims["runs"]["lease_token"]
