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
from pydantic import BaseModel, ConfigDict

from chaos.checker import check_database
from engine.config import Settings
from engine.dag import parse_run
from engine.db import open_pool
from engine.errors import LeaseLost, OutputRefused, StepsRefused
from engine.store import Store
from engine.tools import ToolContext, load_tool_modules, tool
from engine.transitions import ClaimedStep
from tests.plantools import plan_step
from tests.support import (
    Proc,
    api_server,
    base_env,
    events,
    query,
    steps_by_name,
    wait_for,
    wait_run_finished,
    workers,
)
from tests.testtools import echo, emit
from workers.database import DatabaseBackend
from workers.worker import Worker

load_tool_modules(["workers.tools.builtin", "tests.testtools", "tests.plantools"])

TOOLS = {"PGDAG_TOOLS": "tests.testtools,tests.plantools"}


class NoInput(BaseModel):
    model_config = ConfigDict(extra="forbid")


@tool("TEST_PLAN_NAN", NoInput)
async def plan_nan(inp: NoInput, ctx: ToolContext) -> dict[str, object]:
    """Add a step whose input is not JSON (NaN): in-process only."""
    ctx.add_steps([{"name": "x", "tool": "TEST_EMIT", "input": {"value": float("nan")}}])
    return {}


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
        status = query(
            store_url(store), "SELECT status FROM runs WHERE id = %(id)s", {"id": run_id}
        )
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
                    {
                        "seed": {"$ref": "steps.seed.output"},
                        "i": i,
                        "n": {"$ref": "steps.plan.output.value"},
                    },
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
            # (documented limit) a replay of the planning step plans the same names again
            replayed, _ = await store.create_run(
                parse_run({"steps": [plan_step("plan", [emit("once", 1, "plan")])]}, max_steps=100)
            )
            await drive(store, worker, replayed)
            await store.replay(replayed, "plan", reason="test")
            await drive(store, worker, replayed)
            again = steps_by_name(db_url, replayed)
            assert again["plan"]["status"] == "dead_letter", again["plan"]
            assert "a step of this run already has this name" in again["plan"]["error"]
            assert again["once"]["status"] == "skipped"
            nan, _ = await store.create_run(
                parse_run({"steps": [{"name": "plan", "tool": "TEST_PLAN_NAN"}]}, max_steps=100)
            )
            await drive(store, worker, nan)
            nan_plan = steps_by_name(db_url, nan)["plan"]
            assert nan_plan["status"] == "dead_letter" and nan_plan["attempt"] == 1
            assert nan_plan["error"].startswith("addSteps"), nan_plan["error"]
            return good[0], bad[0], refs[0], big[0]
        finally:
            writer.cancel()
            await store.pool.close()

    good, bad, refs, big = asyncio.run(go())

    assert query(
        db_url,
        "SELECT status, steps_total, steps_unfinished FROM runs WHERE id = %(id)s",
        {"id": good},
    )[0] == {"status": "completed", "steps_total": 8, "steps_unfinished": 0}
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
        "fan.0",
        "fan.1",
        "fan.2",
        "after",
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
    problems = json.loads(error[len("added steps refused: ") :])["problems"]
    by = {(p["step"], p["field"]) for p in problems}
    assert ("x", "dependsOn") in by  # unknown dependency
    assert ("y", "tool") in by
    assert ("seed", "name") in by
    assert ("w", "input.extra") in by
    assert not named(events(db_url, bad), "steps_added")
    assert_checker_clean(db_url, bad)

    steps = steps_by_name(db_url, refs)
    assert set(steps) == {"plan", "after"} and steps["plan"]["status"] == "dead_letter"
    problems = json.loads(steps["plan"]["error"][len("added steps refused: ") :])["problems"]
    assert [(p["step"], p["field"]) for p in problems] == [("z", "input.v")]
    assert "is not an ancestor of 'z'" in problems[0]["problem"]

    steps = steps_by_name(db_url, big)
    assert set(steps) == {"plan"} and steps["plan"]["status"] == "dead_letter"
    assert "too many steps: the run would hold 21 > the limit of 20" in steps["plan"]["error"]


def test_a_zombie_or_another_worker_cannot_add_steps(db_url: str) -> None:
    """Steps added under a stale token, by a worker that does not hold the lease, or under
    an expired lease are refused (LeaseLost) and nothing is written; the holder's are added
    once."""

    async def go() -> str:
        pool = await open_pool(db_url, min_size=1, max_size=2)
        store = Store(pool, lease_ttl_s=30)
        short = Store(pool, lease_ttl_s=0.3)
        try:
            run_id, _ = await store.create_run(
                parse_run({"steps": [plan_step("plan", [])]}, max_steps=100)
            )
            new = [emit("child", 1, "plan")]
            old: ClaimedStep = (await store.claim("w", 1))[0]
            await store.release([(old.id, old.lease_token)], worker_id="w")
            cur: ClaimedStep = (await short.claim("w2", 1))[0]
            assert cur.lease_token != old.lease_token
            for token, who in [(old.lease_token, "w"), (cur.lease_token, "w")]:
                with pytest.raises(LeaseLost):
                    await store.complete_adding_steps(
                        cur.id, token, "{}", new, worker_id=who, max_steps=100
                    )
            wait_for(
                lambda: query(
                    db_url,
                    "SELECT lease_expires_at < now() AS gone FROM steps WHERE id = %(id)s",
                    {"id": cur.id},
                )[0]["gone"],
                timeout_s=10,
                what="the short lease to expire",
            )
            with pytest.raises(LeaseLost, match="expired"):
                await store.complete_adding_steps(
                    cur.id, cur.lease_token, "{}", new, worker_id="w2", max_steps=100
                )
            assert set(steps_by_name(db_url, run_id)) == {"plan"}
            assert not named(events(db_url, run_id), "steps_added")
            await store.reap()
            live: ClaimedStep = (await store.claim("w3", 1))[0]
            added = await store.complete_adding_steps(
                live.id, live.lease_token, "{}", new, worker_id="w3", max_steps=100
            )
            assert added.names == ["child"]
            # the same call again (an ambiguous commit retried) finds it recorded: no change
            again = await store.complete_adding_steps(
                live.id, live.lease_token, "{}", new, worker_id="w3", max_steps=100
            )
            assert again.names == ["child"]
            # refused steps: the attempt is a dead letter; the same call again says so too
            other, _ = await store.create_run(
                parse_run({"steps": [plan_step("plan", [])]}, max_steps=100)
            )
            held: ClaimedStep = (await store.claim("w4", 1, tools=["TEST_PLAN"]))[0]
            for _ in range(2):
                with pytest.raises(StepsRefused) as refused:
                    await store.complete_adding_steps(
                        held.id,
                        held.lease_token,
                        "{}",
                        [emit("x", 1, "nope")],
                        worker_id="w4",
                        max_steps=100,
                    )
            assert steps_by_name(db_url, other)["plan"]["status"] == "dead_letter"
            assert set(steps_by_name(db_url, other)) == {"plan"}
            assert refused.value.problems == []  # the repeat knows only the step's state
            # a row Postgres refuses (here a trigger of this test's database): failed for good
            query(
                db_url,
                "CREATE FUNCTION refuse_step() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
                "IF NEW.name = 'refused-by-pg' THEN RAISE EXCEPTION 'no such step here'; "
                "END IF; RETURN NEW; END $$; CREATE TRIGGER refuse_step BEFORE INSERT ON steps "
                "FOR EACH ROW EXECUTE FUNCTION refuse_step()",
            )
            third, _ = await store.create_run(
                parse_run({"steps": [plan_step("plan", [])]}, max_steps=100)
            )
            held = (await store.claim("w5", 1, tools=["TEST_PLAN"]))[0]
            with pytest.raises(OutputRefused, match="no such step here") as pg_refused:
                await store.complete_adding_steps(
                    held.id,
                    held.lease_token,
                    "{}",
                    [emit("ok", 1, "plan"), emit("refused-by-pg", 1, "plan")],
                    worker_id="w5",
                    max_steps=100,
                )
            assert not isinstance(pg_refused.value, StepsRefused)
            third_steps = steps_by_name(db_url, third)
            assert set(third_steps) == {"plan"}
            assert third_steps["plan"]["status"] == "dead_letter"
            assert "output refused by Postgres: no such step here" in third_steps["plan"]["error"]
            return run_id
        finally:
            await pool.close()

    run_id = asyncio.run(go())
    steps = steps_by_name(db_url, run_id)
    assert steps["child"]["status"] == "ready" and steps["plan"]["status"] == "succeeded"
    added = named(events(db_url, run_id), "steps_added")
    assert len(added) == 1 and added[0]["worker_id"] == "w3"
    run = query(
        db_url,
        "SELECT status, steps_total, steps_unfinished FROM runs WHERE id = %(id)s",
        {"id": run_id},
    )[0]
    # the plan was the run's only unfinished step: its success alone would have completed it
    assert run == {"status": "running", "steps_total": 2, "steps_unfinished": 1}


def test_a_worker_killed_inside_its_adding_transaction_leaves_none_and_the_retry_adds_all(
    db_url: str, tmp_path: Path
) -> None:
    """The test holds the run's row lock, so the worker's adding transaction stops inside,
    after locking its step (lock_adding_step) and before inserting; the worker is SIGKILLed
    there. Nothing of it may remain; the reaper's retry on another worker adds the steps,
    once, and the run completes."""
    gate = tmp_path / "gate"
    plan = plan_step(
        "plan",
        [emit("a", 1, "plan"), echo("b", {"a": {"$ref": "steps.a.output"}}, "a")],
        gate=str(gate),
    )
    run_id = submit_run(db_url, {"steps": [plan]})
    with workers(db_url, tmp_path, 1, id_prefix="doomed", **TOOLS) as (doomed,):
        wait_for(
            lambda: steps_by_name(db_url, run_id)["plan"]["status"] == "running",
            what="plan claimed",
        )
        with psycopg.connect(db_url) as holder:
            holder.execute("SELECT 1 FROM runs WHERE id = %s FOR UPDATE", (run_id,))
            gate.touch()
            blocked = wait_for(
                lambda: query(
                    db_url,
                    "SELECT pid FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
                    "AND query LIKE '%%FROM runs WHERE id%%FOR UPDATE%%' AND pid <> %(me)s",
                    {"me": holder.info.backend_pid},
                ),
                what="the worker's adding transaction waiting on the run lock",
            )[0]["pid"]
            # inside its transaction: it holds the plan step's row lock already
            locks = query(
                db_url,
                "SELECT count(*) AS n FROM pg_locks WHERE pid = %(pid)s "
                "AND relation = 'steps'::regclass AND mode = 'RowShareLock'",
                {"pid": blocked},
            )
            assert locks[0]["n"] >= 1
            doomed.kill()
            holder.rollback()
        wait_for(
            lambda: (
                not query(
                    db_url, "SELECT 1 FROM pg_stat_activity WHERE pid = %(pid)s", {"pid": blocked}
                )
            ),
            what="the killed worker's backend to end",
        )
        assert set(steps_by_name(db_url, run_id)) == {"plan"}
        assert not named(events(db_url, run_id), "steps_added")
    with workers(db_url, tmp_path, 1, id_prefix="heir", **TOOLS):
        assert wait_run_finished(db_url, run_id, timeout_s=30) == "completed"
    steps = steps_by_name(db_url, run_id)
    assert set(steps) == {"plan", "a", "b"}
    assert steps["plan"]["attempt"] == 2
    assert steps["b"]["output"]["got"] == {"a": 1}
    added = named(events(db_url, run_id), "steps_added")
    assert len(added) == 1 and added[0]["lease_token"] == steps["plan"]["lease_token"]
    assert added[0]["worker_id"] == "heir0"
    run = query(db_url, "SELECT steps_total FROM runs WHERE id = %(id)s", {"id": run_id})[0]
    assert run["steps_total"] == 3
    assert_checker_clean(db_url, run_id)


def submit_run(db_url: str, body: dict[str, Any]) -> str:
    async def go() -> str:
        pool = await open_pool(db_url, min_size=1, max_size=1)
        try:
            run_id, _ = await Store(pool, lease_ttl_s=30).create_run(parse_run(body, max_steps=100))
            return run_id
        finally:
            await pool.close()

    return asyncio.run(go())


def test_an_agent_adds_steps_with_its_report(db_url: str, tmp_path: Path) -> None:
    """POST /agent/report with addSteps: recorded with the names added (a re-send is a
    duplicate), the added step's $ref reads the plan's output when the agent claims it;
    refused addSteps answer steps_refused with the problems and dead-letter the step."""
    with (
        api_server(db_url, tmp_path, **TOOLS) as base,
        httpx.Client(base_url=base, timeout=30) as c,
    ):
        agent = {"agentId": "planner"}
        r = c.post(
            "/agent/register", json={**agent, "tools": ["AGENT_PLAN", "AGENT_DO"], "concurrency": 2}
        )
        assert r.status_code == 200, r.text
        r = c.post(
            "/runs",
            json={
                "steps": [
                    {"name": "plan", "tool": "AGENT_PLAN"},
                    {"name": "bad", "tool": "AGENT_PLAN"},
                ]
            },
        )
        assert r.status_code == 201, r.text
        run_id = r.json()["id"]
        claimed = c.post("/agent/claim", json={**agent, "tools": ["AGENT_PLAN"], "max": 2}).json()
        by = {s["name"]: s for s in claimed["steps"]}
        plan, bad = by["plan"], by["bad"]
        outcome = {
            "stepId": plan["stepId"],
            "leaseToken": plan["leaseToken"],
            "status": "succeeded",
            "output": {"topic": "pgdag"},
            "addSteps": [
                {
                    "name": "do",
                    "tool": "AGENT_DO",
                    "dependsOn": ["plan"],
                    "input": {"about": {"$ref": "steps.plan.output.topic"}},
                }
            ],
        }
        refused = {
            "stepId": bad["stepId"],
            "leaseToken": bad["leaseToken"],
            "status": "succeeded",
            "output": None,
            "addSteps": [{"name": "other", "tool": "AGENT_DO", "dependsOn": ["ghost"]}],
        }
        r = c.post("/agent/report", json={**agent, "outcomes": [outcome, refused]})
        assert r.status_code == 200, r.text
        first, second = r.json()["results"]
        assert first["result"] == "recorded" and first["added"] == ["do"]
        assert second["result"] == "refused" and second["code"] == "steps_refused"
        assert second["problems"] == [
            {"step": "other", "field": "dependsOn", "problem": "unknown dependency 'ghost'"}
        ]
        again = c.post("/agent/report", json={**agent, "outcomes": [outcome]}).json()
        assert again["results"][0]["result"] == "recorded" and again["results"][0]["duplicate"]
        do = c.post("/agent/claim", json={**agent, "tools": ["AGENT_DO"], "max": 1}).json()
        assert [(s["name"], s["input"]) for s in do["steps"]] == [("do", {"about": "pgdag"})]
        run = c.get(f"/runs/{run_id}").json()
        # a row Postgres refuses (a trigger of this test's database): output_refused
        query(
            db_url,
            "CREATE FUNCTION refuse_step() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
            "IF NEW.name = 'refused-by-pg' THEN RAISE EXCEPTION 'no such step here'; "
            "END IF; RETURN NEW; END $$; CREATE TRIGGER refuse_step BEFORE INSERT ON steps "
            "FOR EACH ROW EXECUTE FUNCTION refuse_step()",
        )
        r = c.post("/runs", json={"steps": [{"name": "pgplan", "tool": "AGENT_PLAN"}]})
        assert r.status_code == 201, r.text
        pg_run = r.json()["id"]
        pg = c.post("/agent/claim", json={**agent, "tools": ["AGENT_PLAN"], "max": 1}).json()
        (claimed_pg,) = pg["steps"]
        answer = c.post(
            "/agent/report",
            json={
                **agent,
                "outcomes": [
                    {
                        "stepId": claimed_pg["stepId"],
                        "leaseToken": claimed_pg["leaseToken"],
                        "status": "succeeded",
                        "addSteps": [{"name": "refused-by-pg", "tool": "AGENT_DO"}],
                    }
                ],
            },
        ).json()["results"][0]
        assert (answer["result"], answer["code"]) == ("refused", "output_refused"), answer
        assert "no such step here" in answer["message"]
        assert set(steps_by_name(db_url, pg_run)) == {"pgplan"}
        assert steps_by_name(db_url, pg_run)["pgplan"]["status"] == "dead_letter"
        # the agent worker (python -m workers --server) sends ctx.add_steps as addSteps
        env = base_env(db_url, **TOOLS)
        del env["DATABASE_URL"]
        agent_worker = Proc(
            [
                "-m",
                "workers",
                "--server",
                base,
                "--worker-id",
                "aw",
                "--agent-log",
                str(tmp_path / "aw.sqlite3"),
            ],
            env,
            tmp_path / "agent-aw.log",
        )
        try:
            planned = c.post(
                "/runs",
                json={
                    "steps": [
                        emit("seed", {"n": 3}),
                        plan_step(
                            "plan",
                            [
                                echo("use", {"n": {"$ref": "steps.seed.output.n"}}, "plan", "seed"),
                                # a step of kind run: the maintenance leader starts its child
                                {
                                    "name": "sub",
                                    "run": {"steps": [emit("c", 5)]},
                                    "dependsOn": ["plan"],
                                },
                            ],
                            "seed",
                        ),
                        plan_step("bad", [emit("late", 1, "ghost")], "seed"),
                    ]
                },
            )
            assert planned.status_code == 201, planned.text
            agent_run = planned.json()["id"]
            assert wait_run_finished(db_url, agent_run, timeout_s=30) == "failed"
        finally:
            agent_worker.stop()
    by_name = steps_by_name(db_url, agent_run)
    assert by_name["use"]["status"] == "succeeded" and by_name["use"]["output"]["got"] == {"n": 3}
    assert by_name["bad"]["status"] == "dead_letter" and "late" not in by_name
    assert by_name["sub"]["status"] == "succeeded", by_name["sub"]
    assert by_name["sub"]["output"]["outputs"] == {"c": 5}
    assert '"field": "dependsOn"' in by_name["bad"]["error"]
    added_by = named(events(db_url, agent_run), "steps_added")
    assert [(e["step_name"], e["worker_id"]) for e in added_by] == [("plan", "aw")]

    steps = {s["name"]: s for s in run["steps"]}
    assert steps["bad"]["status"] == "dead_letter"
    assert steps["bad"]["error"].startswith("added steps refused: ")
    assert [e["detail"]["steps"] for e in named(events(db_url, run_id), "steps_added")] == [["do"]]
