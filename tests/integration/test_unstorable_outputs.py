"""Outputs Postgres jsonb refuses cost only their own step (issue 10, part 2).

A refused output fails its step for good with the reason and where it is; its batch-mates
in the same group commit succeed exactly once; the worker lives. Real workers, the real
`SuccessBatcher`, a real Postgres.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from engine import errors
from engine.config import Settings
from engine.db import open_pool
from engine.store import Store
from tests.support import events, steps_by_name, submit, wait_run_finished, workers
from workers.database import DatabaseBackend
from workers.worker import SuccessBatcher

TEST_TOOLS = {"PGDAG_TOOLS": "tests.testtools"}
LONE_SURROGATE_ERROR = (
    "output.body.items[3].name: lone surrogate \\ud800 cannot be stored in Postgres jsonb"
)


def _load_test_tools() -> None:
    from engine.tools import load_tool_modules

    load_tool_modules(["tests.testtools"])


def _step_events(db_url: str, run_id: str) -> dict[str, list[dict[str, Any]]]:
    by_step: dict[str, list[dict[str, Any]]] = {}
    for e in events(db_url, run_id):
        if e["step_name"] is not None:
            by_step.setdefault(e["step_name"], []).append(e)
    return by_step


def test_a_refused_output_fails_only_its_step_and_the_worker_lives(
    db_url: str, tmp_path: Path
) -> None:
    """Five steps meet at a barrier and finish together on one worker, so their successes
    share group commits; one returns a lone surrogate. It is dead-lettered on attempt 1 with
    the reason and the path; the four others succeed once, on attempt 1."""
    _load_test_tools()
    gate = {"dir": str(tmp_path / "barrier"), "parties": 5}
    (tmp_path / "barrier").mkdir()
    mates = [
        {"name": f"mate{i}", "tool": "TEST_BARRIER", "input": gate, "maxAttempts": 3}
        for i in range(4)
    ]
    poison = {
        "name": "poison",
        "tool": "TEST_UNSTORABLE_OUTPUT",
        "input": {"kind": "lone_surrogate", "barrier": gate},
        "maxAttempts": 3,
    }
    others = [
        {"name": kind, "tool": "TEST_UNSTORABLE_OUTPUT", "input": {"kind": kind}}
        for kind in ("nan", "cycle", "set")
    ]
    run_id = submit(db_url, {"steps": [*mates, poison, *others]})
    with workers(db_url, tmp_path, n=1, concurrency=8, **TEST_TOOLS) as [w]:
        assert wait_run_finished(db_url, run_id) == "failed"
        assert w.popen.poll() is None, w.output()  # the worker lives
        later = submit(db_url, {"steps": [{"name": "next", "tool": "DELAY", "input": {"ms": 0}}]})
        assert wait_run_finished(db_url, later) == "completed"  # and keeps claiming
    steps = steps_by_name(db_url, run_id)
    by_step = _step_events(db_url, run_id)
    for i in range(4):
        mate = steps[f"mate{i}"]
        assert mate["status"] == "succeeded" and mate["attempt"] == 1, mate
        kinds = [e["event"] for e in by_step[f"mate{i}"]]
        assert kinds == ["step_claimed", "step_succeeded"], kinds
    bad = steps["poison"]
    assert bad["status"] == "dead_letter" and bad["attempt"] == 1
    assert bad["error"] == LONE_SURROGATE_ERROR
    dead = [e for e in by_step["poison"] if e["event"] == "step_dead_lettered"]
    assert len(dead) == 1 and dead[0]["detail"]["error"] == LONE_SURROGATE_ERROR
    assert dead[0]["detail"]["retryable"] is False
    assert steps["nan"]["error"] == "output.score: NaN cannot be stored in Postgres jsonb"
    assert steps["cycle"]["error"].startswith("output.self: a cycle")
    assert steps["set"]["error"].startswith("output.tags: set is not JSON")
    for kind in ("nan", "cycle", "set"):
        assert steps[kind]["status"] == "dead_letter" and steps[kind]["attempt"] == 1


def test_a_group_write_postgres_refuses_falls_back_to_one_row_at_a_time(db_url: str) -> None:
    """The pre-check bypassed: a batch of four successes through the real `SuccessBatcher`,
    one with output text Postgres refuses. The batch statement fails; its rows are then
    written one by one: three succeed once (attempt 1, one step_succeeded each, a dependent
    promoted) and the poison one is dead-lettered with the database's own error."""
    run_id = submit(
        db_url,
        {
            "steps": [
                *({"name": n, "tool": "DELAY", "input": {"ms": 0}} for n in ("a", "b", "c", "p")),
                {"name": "after", "tool": "DELAY", "input": {"ms": 0}, "dependsOn": ["a"]},
            ]
        },
    )

    async def go() -> list[BaseException | None]:
        pool = await open_pool(db_url, min_size=1, max_size=2)
        store = Store(pool, lease_ttl_s=30)
        batcher = SuccessBatcher(
            DatabaseBackend(store, Settings(), database_url=db_url, worker_id="w")
        )
        writer = asyncio.create_task(batcher.run())
        try:
            claimed = {c.name: c for c in await store.claim("w", 10)}
            assert set(claimed) == {"a", "b", "c", "p"}
            texts = {n: f'{{"n":"{n}"}}' for n in "abc"}
            texts["p"] = '{"name":"x\\ud800y"}'  # JSON text with a lone surrogate escape
            results = await asyncio.gather(
                *(batcher.record(claimed[n], texts[n]) for n in "abcp"), return_exceptions=True
            )
            assert batcher.batches == 1  # all four were handed to one group write
            return list(results)
        finally:
            writer.cancel()
            await asyncio.gather(writer, return_exceptions=True)
            await pool.close()

    results = asyncio.run(go())
    assert results[:3] == [None, None, None], results
    refused = results[3]
    assert isinstance(refused, errors.OutputRefused), repr(refused)
    assert "invalid input syntax for type json" in str(refused)
    steps = steps_by_name(db_url, run_id)
    by_step = _step_events(db_url, run_id)
    for n in "abc":
        assert steps[n]["status"] == "succeeded" and steps[n]["attempt"] == 1
        assert steps[n]["output"] == {"n": n}
        assert [e["event"] for e in by_step[n]] == ["step_claimed", "step_succeeded"]
    assert steps["after"]["status"] == "ready"
    p = steps["p"]
    assert p["status"] == "dead_letter" and p["attempt"] == 1
    assert "invalid input syntax for type json" in p["error"]
    assert "Unicode low surrogate must follow a high surrogate" in p["error"]
    dead = [e for e in by_step["p"] if e["event"] == "step_dead_lettered"]
    assert len(dead) == 1 and dead[0]["detail"]["error"] == p["error"]
    assert [e["event"] for e in by_step["p"]].count("step_succeeded") == 0


def test_a_lone_success_postgres_refuses_fails_its_step(db_url: str) -> None:
    """The path of ``"idempotent": false`` steps (recorded at once, alone): a refused
    output dead-letters the step with the database's error instead of leaving it running."""
    run_id = submit(db_url, {"steps": [{"name": "once", "tool": "DELAY", "input": {"ms": 0}}]})

    async def go() -> BaseException | None:
        pool = await open_pool(db_url, min_size=1, max_size=2)
        store = Store(pool, lease_ttl_s=30)
        try:
            [step] = await store.claim("w", 10)
            try:
                await store.complete(step, '["\\u0000"]', worker_id="w")
            except Exception as exc:
                return exc
            return None
        finally:
            await pool.close()

    refused = asyncio.run(go())
    step = steps_by_name(db_url, run_id)["once"]
    assert step["status"] == "dead_letter" and step["attempt"] == 1, (step["status"], refused)
    assert "unsupported Unicode escape sequence" in step["error"]
    assert isinstance(refused, errors.OutputRefused), repr(refused)


def test_an_error_text_with_nul_and_lone_surrogate_is_recorded(db_url: str, tmp_path: Path) -> None:
    """The failure path stores error text in text and jsonb columns: a NUL and a lone
    surrogate in it are written as visible escapes, not a failed write."""
    _load_test_tools()
    run_id = submit(
        db_url,
        {
            "steps": [
                {"name": "nasty", "tool": "TEST_NASTY_ERROR", "input": {}},
                {"name": "fine", "tool": "DELAY", "input": {"ms": 0}},
            ]
        },
    )
    with workers(db_url, tmp_path, n=1, **TEST_TOOLS) as [w]:
        assert wait_run_finished(db_url, run_id) == "failed"
        assert w.popen.poll() is None, w.output()
    steps = steps_by_name(db_url, run_id)
    nasty = steps["nasty"]
    assert nasty["status"] == "dead_letter" and nasty["attempt"] == 1
    assert nasty["error"] == "bad \\u0000 byte and lone \\udc01 surrogate"
    dead = [e for e in events(db_url, run_id) if e["event"] == "step_dead_lettered"]
    assert [d["detail"]["error"] for d in dead] == [nasty["error"]]
    assert steps["fine"]["status"] == "succeeded"


def test_the_output_size_cap_is_read_from_the_environment(db_url: str, tmp_path: Path) -> None:
    """PGDAG_MAX_OUTPUT_BYTES reaches the worker: a bigger output fails its step for good."""
    _load_test_tools()
    run_id = submit(
        db_url,
        {
            "steps": [
                {"name": "big", "tool": "TEST_EMIT", "input": {"value": "x" * 300}},
                {"name": "small", "tool": "TEST_EMIT", "input": {"value": "x" * 100}},
            ]
        },
    )
    with workers(db_url, tmp_path, n=1, PGDAG_MAX_OUTPUT_BYTES="200", **TEST_TOOLS):
        assert wait_run_finished(db_url, run_id) == "failed"
    steps = steps_by_name(db_url, run_id)
    assert steps["big"]["status"] == "dead_letter" and steps["big"]["attempt"] == 1
    assert steps["big"]["error"] == (
        "output: 302 bytes of JSON, over the 200-byte cap on a step's output "
        "(PGDAG_MAX_OUTPUT_BYTES)"
    )
    assert steps["small"]["status"] == "succeeded"


@pytest.mark.parametrize(("raw", "problem"), [("ten", "an integer"), ("8", ">= 16")])
def test_a_bad_output_size_cap_is_refused_by_name(raw: str, problem: str) -> None:
    from engine.config import Settings
    from engine.errors import ConfigError

    with pytest.raises(ConfigError, match=f"PGDAG_MAX_OUTPUT_BYTES must be {problem}"):
        Settings.from_env({"PGDAG_MAX_OUTPUT_BYTES": raw})
    assert Settings.from_env({}).max_output_bytes == 8 * 1024 * 1024


def test_writing_a_refused_batch_again_reports_the_same(db_url: str) -> None:
    """The batch retried after an ambiguous commit (the connection dropped after the
    one-by-one writes landed): the recorded steps are recorded, the refused one is still
    reported refused (its failure is there already), and nothing is written twice."""
    run_id = submit(
        db_url, {"steps": [{"name": n, "tool": "DELAY", "input": {"ms": 0}} for n in "ap"]}
    )

    async def go() -> tuple[dict[int, Any], dict[int, Any], dict[str, int]]:
        pool = await open_pool(db_url, min_size=1, max_size=2)
        store = Store(pool, lease_ttl_s=30)
        try:
            claimed = {c.name: c for c in await store.claim("w", 10)}
            batch = [
                (claimed["a"].id, claimed["a"].lease_token, "{}"),
                (claimed["p"].id, claimed["p"].lease_token, '"\\udc00"'),
            ]
            first = await store.complete_many(batch, worker_id="w")
            again = await store.complete_many(batch, worker_id="w")
            return first, again, {n: c.id for n, c in claimed.items()}
        finally:
            await pool.close()

    first, again, ids = asyncio.run(go())
    for outcome in (first, again):
        assert outcome[ids["a"]] is None
        assert isinstance(outcome[ids["p"]], errors.OutputRefused), outcome
    kinds = [e["event"] for e in events(db_url, run_id)]
    assert kinds.count("step_succeeded") == 1 and kinds.count("step_dead_lettered") == 1
