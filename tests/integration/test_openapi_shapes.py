"""The response models of the OpenAPI document (`engine.responses`) against what the API
really answers, in the states a fuzzer with no workers never reaches: steps running,
waiting on a concurrency key, in backoff, dead-lettered, skipped, map children, a delayed
run, a worker holding leases. Each body is validated strictly (JSON mode: no coercion, no
unknown key), so a key added to run_json / event_json / select_run_steps_json without its
model, or a type that differs, fails here."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
from pydantic import BaseModel

from engine import responses
from engine.tools import load_tool_modules
from tests.support import api_server, submit, wait_for, wait_run_finished, workers
from tests.testtools import emit

load_tool_modules(["workers.tools.builtin", "tests.testtools"])  # submit() validates inputs

TOOLS = {"PGDAG_TOOLS": "tests.testtools"}


def conforms(model: type[BaseModel], r: httpx.Response) -> Any:
    """`r`'s body validated by `model` (strict JSON mode); returns the decoded body."""
    assert r.headers["content-type"].startswith("application/json"), r.headers
    model.model_validate_json(r.content, strict=True)
    return r.json()


def test_every_state_of_a_run_conforms_to_the_documented_models(
    db_url: str, tmp_path: Path
) -> None:
    run_id = submit(
        db_url,
        {
            "goal": "shapes",
            "idempotencyKey": "shapes-1",
            "steps": [
                emit("items", [{"n": 1}, {"n": 2, "flaky": True}]),
                {
                    "name": "each",
                    "tool": "TEST_MAP_ITEM",
                    "input": {"n": {"$ref": "item.n"}, "flaky": False},
                    "map": {"$ref": "steps.items.output"},
                    "dependsOn": ["items"],
                },
                {
                    "name": "slow",
                    "tool": "DELAY",
                    "input": {"ms": 1500},
                    "concurrencyKey": "k",
                    "maxConcurrency": 1,
                },
                {
                    "name": "queued",
                    "tool": "DELAY",
                    "input": {"ms": 10},
                    "concurrencyKey": "k",
                    "maxConcurrency": 1,
                },
                {"name": "after", "tool": "DELAY", "input": {"ms": 10}, "dependsOn": ["slow"]},
                {
                    "name": "dead",
                    "tool": "TEST_FAIL_TIMES",
                    "input": {"failTimes": 9, "retryable": False},
                    "maxAttempts": 1,
                    "timeoutMs": 5000,
                    "idempotent": False,
                },
                {"name": "skipped", "tool": "DELAY", "input": {"ms": 0}, "dependsOn": ["dead"]},
                {
                    "name": "cleanup",
                    "tool": "TEST_ECHO",
                    "input": {"status": {"$ref": "steps.dead.status"}},
                    "dependsOn": ["dead"],
                    "runIf": "all_done",
                },
            ],
        },
    )
    later = submit(
        db_url,
        {
            "steps": [{"name": "a", "tool": "DELAY", "input": {"ms": 0}}],
            "startAt": (datetime.now(UTC) + timedelta(hours=1)).isoformat(),
            "priority": 5,
        },
    )
    reasons: set[str] = set()
    holders: list[Any] = []
    with (
        api_server(db_url, tmp_path, **TOOLS) as base,
        httpx.Client(base_url=base, timeout=10) as client,
    ):
        conforms(responses.Health, client.get("/health"))
        before = conforms(responses.Run, client.get(f"/runs/{run_id}"))
        reasons |= {s["waitingFor"]["reason"] for s in before["steps"]}  # noLiveWorker...
        with workers(db_url, tmp_path, 1, concurrency=4, **TOOLS):

            def finished() -> bool:
                run = conforms(responses.Run, client.get(f"/runs/{run_id}"))
                reasons.update(s["waitingFor"]["reason"] for s in run["steps"] if s["waitingFor"])
                held = conforms(responses.WorkerList, client.get("/workers"))
                holders.extend(w for w in held["workers"] if w["currentSteps"])
                return run["status"] in ("completed", "failed")

            wait_for(finished, timeout_s=60, interval_s=0.02, what="the run to finish")
            assert wait_run_finished(db_url, run_id) == "failed"
        run = conforms(responses.Run, client.get(f"/runs/{run_id}"))
        by_name = {s["name"]: s for s in run["steps"]}
        assert by_name["dead"]["status"] == "dead_letter" and by_name["dead"]["error"]
        assert by_name["skipped"]["status"] == "skipped"
        assert by_name["each[1]"]["mapOf"] == "each" and by_name["each"]["mapWidth"] == 2
        assert by_name["cleanup"]["resolvedInput"] == {"status": "dead_letter"}
        # the states seen on the way, each shaped as its model says
        assert {"noLiveWorker", "running", "concurrencyKey", "dependencies"} <= reasons
        assert holders, "no worker was ever seen holding a lease"
        delayed = conforms(responses.Run, client.get(f"/runs/{later}"))
        assert delayed["steps"][0]["waitingFor"]["reason"] == "startAt"

        conforms(responses.RunList, client.get("/runs", params={"limit": 1}))
        events = conforms(responses.EventList, client.get(f"/runs/{run_id}/events"))
        assert {"run_created", "step_claimed"} <= {e["event"] for e in events["events"]}
        bulk = client.post("/runs/retry-dead-letters", json={"dryRun": True})
        assert conforms(responses.RetryDeadLettersResult, bulk)["matched"] == 1
        retried = conforms(responses.Run, client.post(f"/runs/{run_id}/steps/dead/retry", json={}))
        assert {s["name"]: s for s in retried["steps"]}["dead"]["status"] == "ready"
        replayed = client.post(f"/runs/{run_id}/replay", json={"from": "after"})
        conforms(responses.Run, replayed)
        conforms(responses.Run, client.post(f"/runs/{later}/cancel", json={}))

        # errors: one shape
        missing = "00000000-0000-4000-8000-000000000000"
        assert conforms(responses.Error, client.get(f"/runs/{missing}"))["error"] == "not_found"
        conflict = client.post(f"/runs/{later}/cancel", json={})
        assert conforms(responses.Error, conflict)["error"] == "illegal_transition"
        refused = client.post("/runs", json={"steps": [{"name": "x", "tool": "NOPE"}]})
        assert conforms(responses.Error, refused)["problems"][0]["step"] == "x"
        bad_query = client.get("/runs", params={"limit": "lots"})
        assert conforms(responses.Error, bad_query)["problems"][0]["field"] == "limit"
