"""Steps a run adds to itself (issue 15 part 5), on a real Postgres: a tool's
``ctx.add_steps`` (through the worker's own code, in-process) and an agent's ``addSteps``
(through a real API process) insert the new steps with the step's success, all or nothing,
under its fencing token; refused steps fail the step, not retryably, naming the field; a
zombie's steps are refused; a worker SIGKILLed in the middle of the adding transaction leaves
none of them, and the retry adds them once."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest

from chaos.checker import check_database
from engine.config import Settings
from engine.dag import parse_run
from engine.db import open_pool
from engine.errors import LeaseLost, StepsRefused
from engine.store import Store
from engine.tools import load_tool_modules
from engine.transitions import ClaimedStep
from tests.plantools import plan_step
from tests.support import api_server, events, query, steps_by_name, wait_for, wait_run_finished, workers
from tests.testtools import echo, emit
from workers.database import DatabaseBackend
from workers.worker import Worker

load_tool_modules(["workers.tools.builtin", "tests.testtools", "tests.plantools"])

TOOLS = {"PGDAG_TOOLS": "tests.testtools,tests.plantools"}


def assert_checker_clean(db_url: str, run_id: str) -> None:
    with psycopg.connect(db_url) as conn:
        report = check_database(conn, [run_id])
    assert report.ok, report.violations


def named(evs: list[dict[str, Any]], event: str) -> list[dict[str, Any]]:
    return [e for e in evs if e["event"] == event]


async def drive(store: Store, worker: Worker, run_id: str, *, rounds: int = 50) -> None:
    """Claim and run every ready step through the worker's own attempt code until the run
    has finished (no sleep: each round waits for the attempts it started)."""
    for _ in range(rounds):
        status = query(store_url(store), "SELECT status FROM runs WHERE id = %(id)s", {"id": run_id})
        if status[0]["status"] in ("completed", "failed", "cancelled"):
            return
        claimed = await store.claim("w", 50)
        for step in claimed:
            worker._start_attempt(step)
        tasks = [a.task for a in worker._attempts.values() if a.task is not None]
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        elif not claimed:
            await asyncio.sleep(0.05)  # a parked step's wake-up is the reaper's: not here
    raise AssertionError(f"run {run_id} did not finish in {rounds} rounds")


_URLS: dict[int, str] = {}


def store_url(store: Store) -> str:
    return _URLS[id(store)]


async def open_store(db_url: str) -> tuple[Store, Worker, asyncio.Task[None]]:
    pool = await open_pool(db_url, min_size=1, max_size=4)
    store = Store(pool, lease_ttl_s=30)
    _URLS[id(store)] = db_url
    settings = Settings(database_url=db_url, max_steps_per_run=20)
    worker = Worker(
        DatabaseBackend(store, settings, database_url=db_url, worker_id="w"),
        settings,
        concurrency=8,
    )
    return store, worker, asyncio.create_task(worker._successes.run())


def test_added_steps_run_and_their_outputs_flow_by_ref_and_bad_ones_fail_the_step(
    db_url: str,
) -> None:
    """One store and in-process worker for three runs: a plan fans out (its own dependents
    wait for the new steps' run counts, $refs reach the plan and an older step); a plan whose
    steps are refused is a dead letter whose error names each field, with nothing inserted;
    a plan that would pass the run's step limit likewise."""

    async def go() -> tuple[str, str, str, str]:
        store, worker, writer = await open_store(db_url)
        try:
            fan = [
                echo(
                    f"fan.{i}",
                    {"seed": {"$ref": "steps.seed.output"}, "i": i,
                     "n": {"$ref": "steps.plan.output.value"}},
                    "plan",
                    "seed",
                )
                for i in range(3)
            ]
            join = echo(
                "join",
                {"all": [{"$ref": f"steps.fan.{i}.output.got.i"} for i in range(3)]},
                *[f"fan.{i}" for i in range(3)],
            )
            root = emit("free", "no deps")  # an added root: ready at once
            good = await store.create_run(
                parse_run(
                    {
                        "steps": [
                            emit("seed", 5),
                            plan_step("plan", [*fan, join, root], "seed", value=7),
                            emit("after", "old dependent", "plan"),
                        ]
                    },
                    max_steps=100,
                )
            )
            await drive(store, worker, good[0])
            bad_steps = [
                echo("x", {}, "nowhere"),
                {"name": "y", "tool": "NO_SUCH_TOOL"},
                echo("seed", {}),  # the name is taken
                {"name": "w", "tool": "TEST_EMIT", "input": {"value": 1, "extra": 2}},
            ]
            bad = await store.create_run(
                parse_run(
                    {
                        "steps": [
                            emit("seed", 1),
                            plan_step("plan", bad_steps, "seed"),
                            emit("after", 1, "plan"),
                        ]
                    },
                    max_steps=100,
                )
            )
            await drive(store, worker, bad[0])
            # z depends on plan and refers to "after" (pending): not an ancestor it may name
            refs = await store.create_run(
                parse_run(
                    {
                        "steps": [
                            plan_step(
                                "plan", [echo("z", {"v": {"$ref": "steps.after.output"}}, "plan")]
                            ),
                            emit("after", 1, "plan"),
                        ]
                    },
                    max_steps=100,
                )
            )
            await drive(store, worker, refs[0])
            many = [emit(f"m{i}", i, "plan") for i in range(20)]  # 1 + 20 > the limit of 20
            big = await store.create_run(
                parse_run({"steps": [plan_step("plan", many)]}, max_steps=100)
            )
            await drive(store, worker, big[0])
            return good[0], bad[0], refs[0], big[0]
        finally:
            writer.cancel()
            await store.pool.close()

    good, bad, refs, big = asyncio.run(go())

    assert query(db_url, "SELECT status, steps_total, steps_unfinished FROM runs WHERE id = %(id)s",
                 {"id": good})[0] == {"status": "completed", "steps_total": 8, "steps_unfinished": 0}
    steps = steps_by_name(db_url, good)
    assert {n: s["status"] for n, s in steps.items()} == dict.fromkeys(
        ["seed", "plan", "after", "fan.0", "fan.1", "fan.2", "join", "free"], "succeeded"
    )
    assert steps["fan.1"]["output"]["got"] == {"seed": 5, "i": 1, "n": 7}
    assert steps["join"]["output"]["got"] == {"all": [0, 1, 2]}
    evs = events(db_url, good)
    added = named(evs, "steps_added")
    assert len(added) == 1 and added[0]["step_name"] == "plan"
    assert added[0]["detail"]["steps"] == ["fan.0", "fan.1", "fan.2", "join", "free"]
    assert added[0]["lease_token"] == steps["plan"]["lease_token"]
    assert added[0]["detail"]["ready"] == 1  # free; the fan waits for plan, then is made ready
    # the plan's success counted the fan down in the same transaction, after the insert
    plan_done = next(e for e in evs if e["event"] == "step_succeeded" and e["step_name"] == "plan")
    assert added[0]["id"] < plan_done["id"]
    assert {e["step_name"] for e in named(evs, "step_ready") if e["id"] > plan_done["id"]} >= {
        "fan.0", "fan.1", "fan.2", "after"
    }
    assert_checker_clean(db_url, good)

    assert query(db_url, "SELECT status, steps_total FROM runs WHERE id = %(id)s", {"id": bad})[
        0
    ] == {"status": "failed", "steps_total": 3}
    steps = steps_by_name(db_url, bad)
    assert set(steps) == {"seed", "plan", "after"}
    assert steps["plan"]["status"] == "dead_letter" and steps["plan"]["attempt"] == 1
    assert steps["after"]["status"] == "skipped"
    error = steps["plan"]["error"]
    assert error.startswith("added steps refused: ")
    problems = json.loads(error[len("added steps refused: "):])["problems"]
    by = {(p["step"], p["field"]) for p in problems}
    assert ("x", "dependsOn") in by  # unknown dependency
    assert ("y", "tool") in by
    assert ("seed", "name") in by
    assert ("w", "input.extra") in by
    assert not named(events(db_url, bad), "steps_added")
    assert_checker_clean(db_url, bad)

    steps = steps_by_name(db_url, refs)
    assert set(steps) == {"plan", "after"} and steps["plan"]["status"] == "dead_letter"
    problems = json.loads(steps["plan"]["error"][len("added steps refused: "):])["problems"]
    assert [(p["step"], p["field"]) for p in problems] == [("z", "input.v")]
    assert "is not an ancestor of 'z'" in problems[0]["problem"]

    steps = steps_by_name(db_url, big)
    assert set(steps) == {"plan"} and steps["plan"]["status"] == "dead_letter"
    assert "too many steps: the run would hold 21 > the limit of 20" in steps["plan"]["error"]
