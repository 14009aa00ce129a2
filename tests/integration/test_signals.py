"""Signals and wait steps (issue 15, part 1) through the engine, in-process, on a real
Postgres: a wait step parks (pending, no lease) once its dependencies are done, a signal
completes it in the same transaction (its dependents decided as for any success), a signal
sent early is kept and delivered by the maintenance leader's pass, the timeout fails the
attempt (retries wait again, then dead_letter and trigger rules), a signal id is recorded
once, and a signal racing the timeout: exactly one wins, both outcomes audited. Waits are on
conditions with deadlines, never sleeps."""

from __future__ import annotations

import asyncio
import json
from datetime import datetime, timedelta
from typing import Any

import pytest

from chaos.checker import check_database
from engine.dag import parse_run
from engine.db import open_pool
from engine.errors import IllegalTransition, NotFound
from engine.store import Store
from engine.tools import load_tool_modules
from engine.transitions import ClaimedStep, send_signal
from tests.support import events, query, steps_by_name, wait_for
from tests.testtools import echo, emit

load_tool_modules(["workers.tools.builtin", "tests.testtools"])

MISSING_RUN = "00000000-0000-0000-0000-000000000000"


def wait(name: str, signal: str, *deps: str, timeout_s: int = 3600, **extra: Any) -> dict[str, Any]:
    return {
        "name": name,
        "wait": {"signal": signal, "timeoutS": timeout_s},
        "dependsOn": list(deps),
        **extra,
    }


def named(evs: list[dict[str, Any]], event: str, step: str | None = None) -> list[dict[str, Any]]:
    return [e for e in evs if e["event"] == event and (step is None or e["step_name"] == step)]


def assert_checker_clean(db_url: str, *run_ids: str) -> None:
    import psycopg

    with psycopg.connect(db_url) as conn:
        report = check_database(conn, list(run_ids))
    assert report.ok, report.violations


async def open_store(db_url: str, size: int = 2) -> Store:
    pool = await open_pool(db_url, min_size=1, max_size=size)
    return Store(pool, lease_ttl_s=30)


async def create(store: Store, *steps: dict[str, Any]) -> str:
    run_id, _ = await store.create_run(parse_run({"steps": list(steps)}, max_steps=100))
    return run_id


async def finish(store: Store, name: str) -> ClaimedStep:
    """Claim step `name` (and only it must be ready) and record its success."""
    claimed = {c.name: c for c in await store.claim("w", 10, tools=["TEST_EMIT", "TEST_ECHO"])}
    assert list(claimed) == [name], list(claimed)
    step = claimed[name]
    await store.complete(step, json.dumps({"from": name}), worker_id="w")
    return step


async def signal(
    store: Store, run_id: str, name: str, payload: dict[str, Any], signal_id: str
) -> Any:
    return await store.send_signal(
        run_id, name, signal_id=signal_id, payload_json=json.dumps(payload)
    )


async def reap_until(store: Store, field: str, n: int = 1, timeout_s: float = 10) -> None:
    """Run the maintenance leader's pass until it reports `n` of `field` in all."""
    seen = 0
    deadline = asyncio.get_running_loop().time() + timeout_s
    while True:
        reaped = await store.reap_detailed()
        seen += getattr(reaped, field) if reaped is not None else 0
        if seen >= n:
            return
        assert asyncio.get_running_loop().time() < deadline, f"no {field} after {timeout_s}s"
        await asyncio.sleep(0.05)  # polling interval of a condition with a deadline


def test_a_signal_completes_the_waiting_step_and_its_dependents_go_on(db_url: str) -> None:
    async def go() -> None:
        store = await open_store(db_url)
        try:
            run_id = await create(
                store,
                emit("a", 1),
                wait("approve", "approval", "a"),
                echo("b", {"who": {"$ref": "steps.approve.output.by"}}, "approve"),
            )
            await finish(store, "a")
            row = steps_by_name(db_url, run_id)["approve"]
            assert (row["status"], row["deps_remaining"], row["lease_owner"]) == (
                "pending",
                0,
                None,
            )
            assert row["tool"] == "$wait"
            parked = named(events(db_url, run_id), "step_delayed", "approve")
            assert len(parked) == 1
            assert parked[0]["detail"]["reason"] == "signal"
            assert parked[0]["detail"]["signal"] == "approval"
            deadline = datetime.fromisoformat(parked[0]["detail"]["until"])
            assert deadline - row["updated_at"] == timedelta(hours=1)
            body = json.loads(await store.get_run_json(run_id))
            approve = {s["name"]: s for s in body["steps"]}["approve"]
            assert approve["waitingFor"] == {
                "reason": "signal",
                "signal": "approval",
                "deadline": approve["availableAt"],
                "approval": False,
            }
            assert approve["wait"] == {"signal": "approval", "timeoutS": 3600, "approval": False}
            assert approve["delayMs"] is None
            assert datetime.fromisoformat(approve["availableAt"]) == deadline

            # a signal no step waits for, and an unknown run: refused, nothing recorded
            with pytest.raises(IllegalTransition, match=r"no step of run .* waits for signal"):
                await signal(store, run_id, "other", {}, "x1")
            with pytest.raises(NotFound):
                await signal(store, MISSING_RUN, "approval", {}, "x2")

            out = await signal(store, run_id, "approval", {"by": "ada"}, "key-1")
            assert (out.created, out.consumed_by, out.step_status) == (True, "approve", "succeeded")
            rows = steps_by_name(db_url, run_id)
            assert rows["approve"]["status"] == "succeeded"
            assert rows["approve"]["output"] == {"by": "ada"}
            assert rows["approve"]["attempt"] == 1
            assert rows["b"]["status"] == "ready"
            evs = events(db_url, run_id)
            took = named(evs, "step_signalled", "approve")
            assert len(took) == 1 and took[0]["worker_id"] == "signal:key-1"
            assert took[0]["detail"] == {"signal": "approval", "signalId": "key-1"}
            done = named(evs, "step_succeeded", "approve")
            assert len(done) == 1 and done[0]["lease_token"] == took[0]["lease_token"]
            assert len(named(evs, "signal_received")) == 1

            # the same id again: the original, recorded once; another id: the step is done
            again = await signal(store, run_id, "approval", {"by": "someone else"}, "key-1")
            assert (again.created, again.consumed_by, again.payload) == (
                False,
                "approve",
                {"by": "ada"},
            )
            with pytest.raises(IllegalTransition, match="already succeeded"):
                await signal(store, run_id, "approval", {"by": "bob"}, "key-2")
            stored = query(db_url, "SELECT * FROM signals WHERE run_id = %(r)s", {"r": run_id})
            assert len(stored) == 1 and stored[0]["consumed_by"] == rows["approve"]["id"]

            # the payload is the step's output, read downstream through $ref
            claimed = await store.claim("w", 10, tools=["TEST_ECHO"])
            assert [(c.name, c.input) for c in claimed] == [("b", {"who": "ada"})]
            await store.complete(claimed[0], "{}", worker_id="w")
            assert query(db_url, "SELECT status FROM runs WHERE id = %(r)s", {"r": run_id}) == [
                {"status": "completed"}
            ]
            with pytest.raises(IllegalTransition, match="already completed"):
                await signal(store, run_id, "approval", {}, "key-3")
            assert_checker_clean(db_url, run_id)
        finally:
            await store.pool.close()

    asyncio.run(go())


def test_an_early_signal_is_kept_and_delivered_when_the_step_waits(db_url: str) -> None:
    """A signal sent before its step is reached is stored unconsumed; once the step parks,
    the maintenance leader's pass delivers it (within one reaper interval). A wait root
    whose only step waits starts its run through the signal."""

    async def go() -> None:
        store = await open_store(db_url)
        try:
            run_id = await create(store, emit("a", 1), wait("w", "go", "a"), emit("c", 2, "w"))
            early = await signal(store, run_id, "go", {"n": 7}, "early")
            assert (early.created, early.consumed_by, early.step_status) == (True, None, None)
            assert steps_by_name(db_url, run_id)["w"]["status"] == "pending"
            reaped = await store.reap_detailed()
            assert reaped is not None and reaped.signalled == 0  # w is not reached yet
            await finish(store, "a")
            await reap_until(store, "signalled")
            rows = steps_by_name(db_url, run_id)
            assert rows["w"]["status"] == "succeeded" and rows["w"]["output"] == {"n": 7}
            assert rows["c"]["status"] == "ready"
            stored = query(db_url, "SELECT * FROM signals WHERE run_id = %(r)s", {"r": run_id})
            assert stored[0]["consumed_by"] == rows["w"]["id"]
            assert stored[0]["consumed_at"] > stored[0]["received_at"]

            # a run whose only root waits: pending until the signal starts it
            lone = await create(store, wait("only", "ping"))
            assert query(db_url, "SELECT status FROM runs WHERE id = %(r)s", {"r": lone}) == [
                {"status": "pending"}
            ]
            out = await signal(store, lone, "ping", {}, "p1")
            assert out.step_status == "succeeded"
            assert [e["event"] for e in events(db_url, lone) if e["step_id"] is None] == [
                "run_created",
                "signal_received",
                "run_started",
                "run_completed",
            ]
            assert_checker_clean(db_url, run_id, lone)
        finally:
            await store.pool.close()

    asyncio.run(go())


def test_the_timeout_fails_the_attempt_retries_wait_again_then_dead_letter(db_url: str) -> None:
    async def go() -> None:
        store = await open_store(db_url)
        try:
            run_id = await create(
                store,
                wait("w", "late", timeout_s=1, maxAttempts=2),
                emit("strict", 1, "w"),
                emit("anyway", 2, "w", runIf="all_done"),
            )
            await reap_until(store, "timed_out")
            rows = steps_by_name(db_url, run_id)
            assert (rows["w"]["status"], rows["w"]["attempt"]) == ("pending", 1)
            first = named(events(db_url, run_id), "step_wait_timed_out", "w")
            assert len(first) == 1 and first[0]["detail"]["signal"] == "late"
            assert "no signal late within 1 s (attempt 1 of 2)" in first[0]["detail"]["error"]
            assert datetime.fromisoformat(first[0]["detail"]["until"]) > first[0]["created_at"]
            body = json.loads(await store.get_run_json(run_id))
            assert {s["name"]: s for s in body["steps"]}["w"]["waitingFor"]["reason"] == "signal"

            await reap_until(store, "timed_out")
            rows = steps_by_name(db_url, run_id)
            assert (rows["w"]["status"], rows["w"]["attempt"]) == ("dead_letter", 2)
            assert rows["w"]["error"] == "no signal late within 1 s (attempt 2 of 2)"
            assert rows["strict"]["status"] == "skipped"
            assert rows["anyway"]["status"] == "ready"
            dead = named(events(db_url, run_id), "step_dead_lettered", "w")
            assert len(dead) == 1 and dead[0]["detail"]["reason"] == "timeout"
            with pytest.raises(IllegalTransition, match="already dead_letter"):
                await signal(store, run_id, "late", {}, "too-late")

            # a manual retry makes it wait again (never ready: no worker could run it)
            await store.retry_step(run_id, "w")
            rows = steps_by_name(db_url, run_id)
            assert (rows["w"]["status"], rows["w"]["deps_remaining"]) == ("pending", 0)
            out = await signal(store, run_id, "late", {"ok": 1}, "after-retry")
            assert out.step_status == "succeeded"
            assert_checker_clean(db_url, run_id)
        finally:
            await store.pool.close()

    asyncio.run(go())


def test_an_approval_rejected_goes_to_dead_letter_with_the_reason(db_url: str) -> None:
    async def go() -> None:
        store = await open_store(db_url)
        try:
            run_id = await create(
                store,
                {
                    "name": "ok",
                    "wait": {"signal": "approval", "timeoutS": 60, "approval": True},
                    "maxAttempts": 3,
                },
                emit("ship", 1, "ok"),
            )
            out = await signal(
                store, run_id, "approval", {"approved": False, "reason": "too risky"}, "r1"
            )
            assert out.step_status == "dead_letter"
            rows = steps_by_name(db_url, run_id)
            assert rows["ok"]["status"] == "dead_letter" and rows["ok"]["attempt"] == 1
            assert rows["ok"]["error"] == "rejected by signal 'approval' (id r1): too risky"
            assert rows["ship"]["status"] == "skipped"
            assert query(db_url, "SELECT status FROM runs WHERE id = %(r)s", {"r": run_id}) == [
                {"status": "failed"}
            ]
            # a cancelled run's wait step is cancelled; a signal then is refused, not kept
            cancelled = await create(store, wait("w", "never"))
            await store.cancel_run(cancelled)
            assert steps_by_name(db_url, cancelled)["w"]["status"] == "cancelled"
            with pytest.raises(IllegalTransition, match="already cancelled"):
                await signal(store, cancelled, "never", {}, "c1")
            assert not query(db_url, "SELECT 1 FROM signals WHERE run_id = %(r)s", {"r": cancelled})
            assert_checker_clean(db_url, run_id, cancelled)
        finally:
            await store.pool.close()

    asyncio.run(go())


def test_a_signal_racing_the_timeout_exactly_one_wins(db_url: str) -> None:
    """Runs whose wait step is past its deadline (maxAttempts 1): the leader's pass and a
    signal per run race on separate connections. Per run exactly one outcome is recorded
    and audited (step_succeeded by the signal, or step_dead_lettered by the timeout), never
    both; a signal that lost is refused (409) and nothing of it is kept. Rounds are repeated
    (at most 4) until both outcomes have happened, and each round is judged in full."""

    async def round_(store: Store, n: int) -> list[str]:
        runs = [await create(store, wait("w", "s", timeout_s=1, maxAttempts=1)) for _ in range(n)]

        def all_due() -> bool:
            rows = query(
                db_url,
                "SELECT bool_and(available_at <= now()) AS due FROM steps"
                " WHERE run_id = ANY(%(ids)s::uuid[])",
                {"ids": runs},
            )
            return bool(rows[0]["due"])

        await asyncio.to_thread(wait_for, all_due, timeout_s=10, what="deadlines passed")

        async def one_signal(i: int) -> str:
            await asyncio.sleep(0.002 * i)  # spread the signals over the pass
            try:
                async with store.pool.connection() as conn:
                    out = await send_signal(
                        conn, runs[i], "s", signal_id=f"race-{i}", payload_json="{}"
                    )
            except IllegalTransition:
                return "lost"
            return "won" if out.step_status == "succeeded" else "kept"

        async def one_pass() -> None:
            await asyncio.sleep(0.002 * (n // 2))
            await store.reap_detailed()

        results = await asyncio.gather(*(one_signal(i) for i in range(n)), one_pass())
        outcomes: list[str] = list(results[:n])
        assert "kept" not in outcomes
        for run_id, outcome in zip(runs, outcomes, strict=True):
            evs = events(db_url, run_id)
            won = named(evs, "step_succeeded", "w")
            timed_out = named(evs, "step_dead_lettered", "w")
            assert len(won) + len(timed_out) == 1, (outcome, evs)
            status = steps_by_name(db_url, run_id)["w"]["status"]
            kept = query(
                db_url,
                "SELECT count(*)::int AS n FROM signals WHERE run_id = %(r)s",
                {"r": run_id},
            )[0]["n"]
            if outcome == "won":
                assert (status, len(won), kept) == ("succeeded", 1, 1)
                assert named(evs, "step_signalled", "w")
            else:
                assert (status, len(timed_out), kept) == ("dead_letter", 1, 0)
                assert timed_out[0]["detail"]["reason"] == "timeout"
        assert_checker_clean(db_url, *runs)
        return outcomes

    async def go() -> None:
        store = await open_store(db_url, size=12)
        try:
            seen: set[str] = set()
            for _ in range(4):
                seen |= set(await round_(store, 12))
                if seen == {"won", "lost"}:
                    break
            assert seen == {"won", "lost"}, f"only {seen} in 4 rounds of 12 races"
        finally:
            await store.pool.close()

    asyncio.run(go())
