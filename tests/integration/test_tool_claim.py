"""Mixed worker pools: a worker claims only steps whose tool it has (issue 10, part 1).

Real worker processes on a real Postgres. "Capable" workers load the test tools
(``PGDAG_TOOLS=tests.testtools``); "plain" workers have only the built-ins, so every
``TEST_*`` step is one they cannot run. Before the fix, plain workers claimed such steps,
failed them with ``unknown tool`` and spent their attempts.

Proving that something is *not* claimed needs no sleep: a probe DELAY step submitted later
(same priority, later ``available_at``) is behind the waiting steps in claim order, so once
a plain worker has claimed the probe, any waiting step it could claim it already had.
"""

from __future__ import annotations

import asyncio
import json
import signal
from pathlib import Path
from typing import Any

import httpx
import psycopg
from websockets.sync.client import connect

from engine.db import open_pool
from engine.sql import queries
from engine.store import Store
from engine.tools import load_tool_modules
from tests.support import (
    api_server,
    events,
    query,
    steps_by_name,
    submit,
    wait_for,
    wait_run_finished,
    workers,
)
from tests.testtools import emit

load_tool_modules(["workers.tools.builtin", "tests.testtools"])  # submit() validates inputs

CAPABLE = {"PGDAG_TOOLS": "tests.testtools"}


def live_workers(db_url: str) -> set[str]:
    rows = query(db_url, "SELECT id FROM workers WHERE status <> 'stopped'")
    return {r["id"] for r in rows}


def claims_by_step(db_url: str, run_id: str) -> dict[str, list[str]]:
    """Each step's claiming workers, in order, from the audit log's step_claimed rows."""
    out: dict[str, list[str]] = {}
    for e in events(db_url, run_id):
        if e["event"] == "step_claimed":
            out.setdefault(e["step_name"], []).append(e["worker_id"])
    return out


def probe_claimed_by_plain(db_url: str) -> None:
    """Submit a DELAY step and wait until it succeeded: the plain workers have claimed
    everything ahead of it in claim order that they could claim."""
    run_id = submit(db_url, {"steps": [{"name": "probe", "tool": "DELAY", "input": {"ms": 0}}]})
    assert wait_run_finished(db_url, run_id) == "completed"


def api_steps(base: str, run_id: str) -> dict[str, dict[str, Any]]:
    body = httpx.get(f"{base}/runs/{run_id}", timeout=10).json()
    return {s["name"]: s for s in body["steps"]}


def ws_snapshot_steps(base: str, run_id: str) -> dict[str, dict[str, Any]]:
    """The steps of the first message of ``/ws/runs/{run_id}`` (the snapshot)."""
    url = "ws://" + base.removeprefix("http://") + f"/ws/runs/{run_id}"
    with connect(url, proxy=None, max_size=None) as ws:
        message = json.loads(ws.recv(timeout=30))
    assert message["type"] == "snapshot", message
    return {s["name"]: s for s in message["run"]["steps"]}


def retry_step(db_url: str, run_id: str, step: str) -> None:
    async def go() -> None:
        pool = await open_pool(db_url, min_size=1, max_size=1)
        try:
            await Store(pool, lease_ttl_s=2).retry_step(run_id, step)
        finally:
            await pool.close()

    asyncio.run(go())


def test_mixed_pool_only_the_capable_worker_claims_custom_steps(
    db_url: str, tmp_path: Path
) -> None:
    """The field report: one capable and two plain workers, 12 custom-tool steps with
    maxAttempts 1. Before the fix most of them ended in dead_letter with "unknown tool"."""
    with (
        workers(db_url, tmp_path, n=2, id_prefix="plain"),
        workers(db_url, tmp_path, n=1, id_prefix="cap", **CAPABLE),
    ):
        wait_for(
            lambda: live_workers(db_url) >= {"plain0", "plain1", "cap0"},
            what="three workers registered",
        )
        run_id = submit(db_url, {"steps": [emit(f"e{i}", i, maxAttempts=1) for i in range(12)]})
        status = wait_run_finished(db_url, run_id)
    steps = steps_by_name(db_url, run_id)
    dead = {n: s["error"] for n, s in steps.items() if s["status"] == "dead_letter"}
    assert dead == {}
    assert status == "completed"
    assert {s["status"] for s in steps.values()} == {"succeeded"}
    claims = claims_by_step(db_url, run_id)
    assert claims == {f"e{i}": ["cap0"] for i in range(12)}


def test_step_waits_for_a_worker_with_its_tool_then_runs(db_url: str, tmp_path: Path) -> None:
    """Plain workers only: the custom step waits unclaimed (attempt 0) and says which tool
    it waits for, over HTTP and in the WebSocket snapshot; a capable worker started later
    picks it up."""
    with (
        api_server(db_url, tmp_path) as base,
        workers(db_url, tmp_path, n=2, id_prefix="plain"),
    ):
        wait_for(lambda: live_workers(db_url) >= {"plain0", "plain1"}, what="plain workers")
        run_id = submit(
            db_url,
            {
                "steps": [
                    emit("custom", {"x": 1}, maxAttempts=1),
                    {"name": "builtin", "tool": "DELAY", "input": {"ms": 0}},
                ]
            },
        )
        # "custom" is ahead of "builtin" in claim order: had it been claimable, the claim
        # that took "builtin" would have taken it first.
        wait_for(lambda: steps_by_name(db_url, run_id)["builtin"]["status"] == "succeeded")
        row = steps_by_name(db_url, run_id)["custom"]
        assert (row["status"], row["attempt"], row["error"]) == ("ready", 0, None)
        expected = {"reason": "noLiveWorker", "tool": "TEST_EMIT"}
        assert api_steps(base, run_id)["custom"]["waitingFor"] == expected
        assert ws_snapshot_steps(base, run_id)["custom"]["waitingFor"] == expected
        with workers(db_url, tmp_path, n=1, id_prefix="cap", **CAPABLE):
            assert wait_run_finished(db_url, run_id) == "completed"
    row = steps_by_name(db_url, run_id)["custom"]
    assert (row["status"], row["attempt"], row["output"]) == ("succeeded", 1, {"x": 1})
    assert claims_by_step(db_url, run_id)["custom"] == ["cap0"]


def test_released_reaped_retried_and_map_steps_go_only_to_capable_workers(
    db_url: str, tmp_path: Path
) -> None:
    """Every other way a step becomes ready again (graceful-shutdown release, a reaped
    lease, a manual retry of a dead letter) and a map step's expansion and children: while
    only plain workers live, none of them is claimed; capable workers started later run them."""
    rel_dir, reap_dir = tmp_path / "rel", tmp_path / "reap"
    rel_dir.mkdir()
    reap_dir.mkdir()
    fixed = tmp_path / "fixed"
    run_id = submit(
        db_url,
        {
            "steps": [
                # barriers of two parties: each blocks (running) until we add a second file
                {
                    "name": "rel",
                    "tool": "TEST_BARRIER",
                    "input": {"dir": str(rel_dir), "parties": 2},
                },
                {
                    "name": "reap",
                    "tool": "TEST_BARRIER",
                    "input": {"dir": str(reap_dir), "parties": 2},
                },
                {
                    "name": "dl",
                    "tool": "TEST_FAIL_UNTIL_FILE",
                    "input": {"path": str(fixed)},
                    "maxAttempts": 1,
                },
                emit("src", [{"n": 1}, {"n": 2}, {"n": 3}]),
                {
                    "name": "m",
                    "tool": "TEST_MAP_ITEM",
                    "map": {"$ref": "steps.src.output"},
                    "input": {"n": {"$ref": "item.n"}},
                    "dependsOn": ["src", "rel"],
                },
            ]
        },
    )
    with workers(db_url, tmp_path, n=2, id_prefix="plain"):
        wait_for(lambda: live_workers(db_url) >= {"plain0", "plain1"}, what="plain workers")
        # 1. A capable worker takes rel and reap (both block), dead-letters dl, runs src;
        #    then shuts down gracefully: rel and reap are released, unspent.
        with workers(
            db_url, tmp_path, n=1, id_prefix="capA", PGDAG_SHUTDOWN_GRACE="0.2", **CAPABLE
        ) as [cap_a]:
            wait_for(
                lambda: (
                    (s := steps_by_name(db_url, run_id))["rel"]["status"] == "running"
                    and s["reap"]["status"] == "running"
                    and s["dl"]["status"] == "dead_letter"
                    and s["src"]["status"] == "succeeded"
                ),
                what="rel and reap running, dl dead-lettered, src succeeded",
            )
            cap_a.signal(signal.SIGTERM)
            assert cap_a.popen.wait(timeout=20) == 0
        retry_step(db_url, run_id, "dl")
        fixed.touch()
        probe_claimed_by_plain(db_url)
        steps = steps_by_name(db_url, run_id)
        for name in ("rel", "reap", "dl"):
            assert (steps[name]["status"], steps[name]["attempt"]) == ("ready", 0), name
        assert steps["m"]["status"] == "pending"

        # 2. A second capable worker takes rel (let through), reap (still blocked) and dl,
        #    and expands m and runs its children; then it is SIGKILLed while reap runs.
        (rel_dir / "let-through").touch()
        with workers(db_url, tmp_path, n=1, id_prefix="capB", **CAPABLE) as [cap_b]:
            wait_for(
                lambda: (
                    (s := steps_by_name(db_url, run_id))["m"]["status"] == "succeeded"
                    and s["dl"]["status"] == "succeeded"
                    and s["reap"]["status"] == "running"
                ),
                what="m and dl succeeded, reap running",
            )
            cap_b.kill()
        # the plain workers' reaper requeues reap once its lease expires
        wait_for(
            lambda: any(
                e["event"] == "step_lease_expired" and e["step_name"] == "reap"
                for e in events(db_url, run_id)
            ),
            what="reap's lease to expire",
        )
        probe_claimed_by_plain(db_url)
        reap = steps_by_name(db_url, run_id)["reap"]
        assert (reap["status"], reap["attempt"]) == ("ready", 1)

        # 3. A third capable worker finishes the run.
        (reap_dir / "let-through").touch()
        with workers(db_url, tmp_path, n=1, id_prefix="capC", **CAPABLE):
            assert wait_run_finished(db_url, run_id) == "completed"

    steps = steps_by_name(db_url, run_id)
    assert steps["m"]["output"] == [
        {"n": n, "double": 2 * n, "key": f"{run_id}:m[{n - 1}]"} for n in (1, 2, 3)
    ]
    claims = claims_by_step(db_url, run_id)
    assert set(claims) == {"rel", "reap", "dl", "src", "m", "m[0]", "m[1]", "m[2]"}
    plain = {n: w for n, w in claims.items() if any(x.startswith("plain") for x in w)}
    assert plain == {}
    assert claims["rel"] == ["capA0", "capB0"]
    assert claims["reap"] == ["capA0", "capB0", "capC0"]
    assert claims["dl"] == ["capA0", "capB0"]
    assert claims["m"] == ["capB0", "capB0"]  # the expansion, then the join


def test_claim_does_not_walk_a_backlog_of_another_tool(db_url: str) -> None:
    """20,000 ready steps of a tool this worker lacks, ahead of its own in claim order: the
    claim reads steps_ready_idx for its own tools only, not the backlog. The walks run
    inside pgdag_pick_ready, whose plan EXPLAIN does not show, so the check is the buffers
    the whole claim touched (a Function Scan counts its function's reads): about a hundred
    (the claim's own writes, the audit row, the trigger), where one filtered walk of the
    ready index read the backlog first (over 600 pages behind 20,000 steps;
    docs/claim-plan.md)."""
    backlog = submit(db_url, {"steps": [emit("g0", 0)]})
    query(
        db_url,
        "INSERT INTO steps (run_id, name, tool, input, status, max_attempts, deps_remaining)"
        " SELECT %(run)s, 'g' || g, 'TEST_EMIT', '{}', 'ready', 3, 0"
        " FROM generate_series(1, 20000) g",
        {"run": backlog},
    )  # older than the DELAY steps below, so ahead of them in claim order
    mine = submit(
        db_url,
        {"steps": [{"name": f"d{i}", "tool": "DELAY", "input": {"ms": 0}} for i in range(5)]},
    )
    query(db_url, "ANALYZE steps")
    params = {"worker_id": "w", "limit": 10, "lease_ttl_s": 30, "tools": ["DELAY", "HTTP_GET_JSON"]}
    with psycopg.connect(db_url) as conn:  # transactions rolled back: nothing is claimed
        conn.execute(queries["claim_steps"], params)  # compiles pgdag_pick_ready's plans
        conn.rollback()
        plan = conn.execute(
            "EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) " + queries["claim_steps"], params
        ).fetchone()[0]
        claimed = conn.execute(
            "SELECT run_id, count(*) AS n FROM steps WHERE status = 'running' GROUP BY run_id"
        ).fetchall()
        conn.rollback()
    assert [(str(r), n) for r, n in claimed] == [(mine, 5)]
    top = plan[0]["Plan"]
    touched = top["Shared Hit Blocks"] + top["Shared Read Blocks"]
    assert touched < 250, f"the claim touched {touched} buffers: it walked the backlog"
    assert steps_by_name(db_url, backlog)["g0"]["status"] == "ready"


def test_claim_functions_read_outputs_no_older_than_their_walks(db_url: str) -> None:
    """pgdag_pick_ready locks rows, so it is VOLATILE and its walks take snapshots newer
    than the claim statement's: they can claim a step made ready after the statement began.
    pgdag_ref_context reads the outputs that step refers to; STABLE, it would read the
    statement's older snapshot, in which the step referred to may still be running (a CI
    run on PostgreSQL 18 failed so: "step a is running, so it has no output"). Both must
    be VOLATILE (pg_proc.provolatile 'v'; PostgreSQL docs, 38.7 Function Volatility
    Categories: a VOLATILE function's queries see changes committed meanwhile)."""
    rows = query(
        db_url,
        "SELECT proname, provolatile FROM pg_proc"
        " WHERE proname IN ('pgdag_pick_ready', 'pgdag_ref_context') ORDER BY proname",
    )
    assert [(r["proname"], r["provolatile"]) for r in rows] == [
        ("pgdag_pick_ready", "v"),
        ("pgdag_ref_context", "v"),
    ]


def test_a_step_inserted_while_a_claim_runs_keeps_its_concurrency_slot(db_url: str) -> None:
    """pgdag_pick_ready's walks see rows committed after the claim statement's snapshot. A
    keyed step INSERTED in that gap was picked, took a concurrency slot in pgdag_take_slots,
    and then was not claimed (the UPDATE cannot see it): the slot was never given back and
    the key stalled for good. The gap is made deterministic: the pick waits on an advisory
    lock the test holds while another transaction submits the step and commits."""
    import threading

    from engine.dag import parse_run

    submit(db_url, {"steps": [emit("other", 1)]})  # a row the walk does not take
    [definition] = query(db_url, "SELECT pg_get_functiondef('pgdag_pick_ready'::regproc) AS d")
    gated = definition["d"].replace(
        "BEGIN\n",
        "BEGIN\n    PERFORM pg_advisory_lock(4242); PERFORM pg_advisory_unlock(4242);\n",
        1,
    )
    query(db_url, gated)
    params = {"worker_id": "w", "limit": 10, "lease_ttl_s": 30, "tools": ["DELAY"]}
    spec = parse_run(
        {
            "steps": [
                {
                    "name": "k",
                    "tool": "DELAY",
                    "input": {"ms": 0},
                    "concurrencyKey": "gap",
                    "maxConcurrency": 1,
                }
            ]
        },
        max_steps=10,
    )
    result: list[Any] = []
    with (
        psycopg.connect(db_url, autocommit=True) as gate,
        psycopg.connect(db_url) as writer,
    ):
        gate.execute("SELECT pg_advisory_lock(4242)")
        # The writer's transaction starts before the claim, so its rows' available_at
        # (its now()) is not later than the claim's now(): the walk's filter lets them by.
        writer.execute("SELECT now()")

        def claim() -> None:
            with psycopg.connect(db_url, autocommit=True) as conn:
                result.append(conn.execute(queries["claim_steps"], params).fetchall())

        claimer = threading.Thread(target=claim)
        claimer.start()
        wait_for(
            lambda: query(
                db_url,
                "SELECT 1 FROM pg_stat_activity WHERE wait_event_type = 'Lock'"
                " AND wait_event = 'advisory'",
            ),
            what="the claim to wait inside pgdag_pick_ready",
        )
        row = writer.execute(  # committed after the claim statement's snapshot
            queries["insert_run"],
            {
                "goal": "gap",
                "idempotency_key": None,
                "idempotency_fingerprint": None,
                "steps_total": 1,
                "priority": 0,
                "start_at": None,
                "trace_context": None,
            },
        ).fetchone()
        assert row is not None
        writer.execute(
            queries["insert_steps"],
            {"run_id": row[0], "steps": spec.steps_json(), "priority": 0, "start_at": None},
        )
        writer.commit()
        gate.execute("SELECT pg_advisory_unlock(4242)")
        claimer.join(timeout=30)
    assert result == [[]]  # the new row is not this statement's to claim
    [slot] = query(db_url, "SELECT running FROM concurrency_slots WHERE key = 'gap'")
    assert slot["running"] == 0, "a slot was taken for a step that was not claimed"
    with psycopg.connect(db_url, autocommit=True) as conn:
        again = conn.execute(queries["claim_steps"], params).fetchall()
    assert len(again) == 1  # the next claim takes it, and its slot
    [slot] = query(db_url, "SELECT running FROM concurrency_slots WHERE key = 'gap'")
    assert slot["running"] == 1
