"""Data-flow transitions in-process, at the moments that matter: a map step losing the lease
of its join, and a replay racing a worker's claim."""

from __future__ import annotations

import asyncio
from typing import Any

import psycopg
import pytest

from engine.dag import parse_run
from engine.db import open_pool
from engine.errors import IllegalTransition
from engine.store import Store
from engine.tools import load_tool_modules
from tests.support import events, query, steps_by_name

load_tool_modules(["workers.tools.builtin"])


def delay(name: str, *deps: str, **extra: Any) -> dict[str, Any]:
    return {"name": name, "tool": "DELAY", "input": {"ms": 0}, "dependsOn": list(deps), **extra}


def test_a_map_step_dead_lettered_at_its_join_is_retried_without_expanding_again(
    db_url: str,
) -> None:
    async def go() -> None:
        pool = await open_pool(db_url, min_size=1, max_size=2)
        store = Store(pool, lease_ttl_s=30)
        try:
            spec = parse_run(
                {
                    "steps": [
                        delay("items"),
                        delay("m", "items", map={"$ref": "steps.items.output"}, maxAttempts=1),
                        delay("after", "m"),
                    ]
                },
                max_steps=10,
            )
            run_id, _ = await store.create_run(spec)
            (items,) = await store.claim("w", 10)
            await store.complete(items, "[10, 20]", worker_id="w")
            (m,) = await store.claim("w", 10)
            assert m.map_expand and m.attempt == 1
            expansion = await store.expand_map(m, worker_id="w", max_width=100)
            assert expansion.width == 2
            for child in await store.claim("w", 10):
                await store.complete(child, '{"ok": true}', worker_id="w")
            (join,) = await store.claim("w", 10)
            assert join.map_join and join.attempt == 1  # expanding spent no attempt
            query(db_url, "UPDATE steps SET lease_expires_at = now() - interval '1 second'")
            assert await store.reap() == 1
            steps = steps_by_name(db_url, run_id)
            assert steps["m"]["status"] == "dead_letter" and steps["after"]["status"] == "skipped"
            await store.retry_step(run_id, "m")
            (again,) = await store.claim("w", 10)
            assert again.map_join and not again.map_expand
            await store.complete(again, "null", worker_id="w")
            (after,) = await store.claim("w", 10)
            await store.complete(after, "{}", worker_id="w")
        finally:
            await pool.close()
        steps = steps_by_name(db_url, run_id)
        assert steps["m"]["output"] == [{"ok": True}, {"ok": True}]
        assert steps["m"]["map_width"] == 2
        assert sum(1 for e in events(db_url, run_id) if e["event"] == "step_map_expanded") == 1
        run = query(db_url, "SELECT status FROM runs WHERE id = %(id)s", {"id": run_id})[0]
        assert run["status"] == "completed"

    asyncio.run(go())


def test_a_replay_never_resets_a_step_a_worker_claimed_while_it_waited(db_url: str) -> None:
    """The replay waits on a lock held elsewhere while a worker claims a step it would
    reset; when it gets the lock it sees the claim and refuses, leaving the attempt alone."""

    async def go() -> None:
        pool = await open_pool(db_url, min_size=1, max_size=3)
        store = Store(pool, lease_ttl_s=30)
        try:
            spec = parse_run(
                {"steps": [delay("a"), delay("b", "a", idempotent=False)]}, max_steps=10
            )
            run_id, _ = await store.create_run(spec)
            (a,) = await store.claim("w", 10)
            await store.complete(a, "{}", worker_id="w")
            blocker = await psycopg.AsyncConnection.connect(db_url)
            await blocker.execute(
                "SELECT 1 FROM steps WHERE run_id = %s AND name = 'a' FOR UPDATE", [run_id]
            )
            replay = asyncio.create_task(store.replay(run_id, "a", reason="test"))
            await asyncio.sleep(0)  # let the replay start and queue on the lock
            for _ in range(200):
                waiting = query(
                    db_url,
                    "SELECT count(*) AS n FROM pg_locks"
                    " WHERE NOT granted AND locktype = 'transactionid'",
                )[0]["n"]
                if waiting:
                    break
                await asyncio.sleep(0.01)
            assert waiting, "the replay never waited on the lock"
            (b,) = await store.claim("w2", 10)  # the worker takes b meanwhile
            await blocker.rollback()
            await blocker.close()
            with pytest.raises(IllegalTransition, match="running"):
                await replay
            steps = steps_by_name(db_url, run_id)
            assert steps["b"]["status"] == "running" and steps["b"]["lease_token"] == b.lease_token
            await store.complete(b, "{}", worker_id="w2")  # its result is still accepted
        finally:
            await pool.close()
        kinds = [e["event"] for e in events(db_url, run_id)]
        assert "step_replayed" not in kinds and "run_replayed" not in kinds

    asyncio.run(go())
