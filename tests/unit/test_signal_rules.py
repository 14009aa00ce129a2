"""Wait steps (issue 15, part 1) without a database: how a run with one is parsed and
stored, the reserved tool name no tool or agent may take, and resets of a wait step."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from engine.agents import RegisterRequest
from engine.builder import Run
from engine.dag import MAX_WAIT_TIMEOUT_S, WAIT_TOOL, parse_run
from engine.errors import ConfigError, ValidationFailed
from engine.rules import GraphStep, plan_reset
from engine.tools import load_tool_modules, tool

load_tool_modules(["workers.tools.builtin"])


def test_a_wait_step_is_stored_with_the_reserved_tool_and_its_timeout_as_its_delay() -> None:
    spec = parse_run(
        {
            "steps": [
                {"name": "a", "tool": "DELAY", "input": {"ms": 1}},
                {
                    "name": "ok",
                    "wait": {
                        "signal": "approval",
                        "timeoutS": MAX_WAIT_TIMEOUT_S,
                        "approval": True,
                    },
                    "dependsOn": ["a"],
                },
            ]
        },
        max_steps=10,
    )
    rows = {r["name"]: r for r in spec.rows()}
    assert rows["ok"]["tool"] == WAIT_TOOL == "$wait"
    assert rows["ok"]["delayMs"] == MAX_WAIT_TIMEOUT_S * 1000
    assert (rows["ok"]["waitSignal"], rows["ok"]["waitApproval"]) == ("approval", True)
    assert "waitSignal" not in rows["a"] and "delayMs" not in rows["a"]
    # a run without wait steps keeps the fingerprint main computed before waits existed
    plain = parse_run(
        {"idempotencyKey": "k", "steps": [{"name": "a", "tool": "DELAY", "input": {"ms": 1}}]},
        max_steps=10,
    )
    assert plain.fingerprint() == "6d9bcd8be3072cd6ecd441bb32fb32e9e6bb803b42e1f06b6edfe2da2a24bee6"


def test_no_tool_and_no_agent_may_take_a_reserved_name() -> None:
    with pytest.raises(ConfigError, match="are pgdag's"):
        tool(WAIT_TOOL, RegisterRequest)
    body: dict[str, Any] = {"agentId": "a1", "tools": ["OK", WAIT_TOOL], "concurrency": 1}
    with pytest.raises(ValidationError, match=r"tools\.1"):
        RegisterRequest.model_validate(body)


def step(i: int, status: str, **extra: Any) -> GraphStep:
    return GraphStep(
        id=i,
        name=f"s{i}",
        status=status,
        run_if=extra.get("run_if", "all_succeeded"),
        is_map=False,
        map_width=None,
        map_parent_id=None,
        delay_ms=extra.get("delay_ms"),
        waits=extra.get("waits", False),
    )


def test_a_retried_or_replayed_wait_step_waits_again_never_ready() -> None:
    steps = [step(1, "succeeded"), step(2, "dead_letter", delay_ms=60_000, waits=True)]
    retried, _ = plan_reset(
        steps,
        [(1, 2)],
        [2],
        follow=frozenset({"pending", "skipped"}),
        force_ready=True,
        delayed=False,
    )
    assert [(r.id, r.status, r.remaining) for r in retried] == [(2, "pending", 0)]
    replayed, _ = plan_reset(steps, [(1, 2)], [1], follow=None, force_ready=False, delayed=False)
    assert [(r.id, r.status, r.remaining) for r in replayed] == [(1, "ready", 0), (2, "pending", 1)]


def test_the_builder_makes_wait_steps_the_api_takes() -> None:
    run = Run("approve, then ship")
    draft = run.step("draft", "DELAY", ms=1)
    ok = run.wait("ok", "approval", timeout_s=3600, approval=True, depends_on=[draft])
    run.step("ship", "DELAY", ms=ok.output["holdMs"])
    body = run.to_dict()
    assert body["steps"][1] == {
        "name": "ok",
        "wait": {"signal": "approval", "timeoutS": 3600, "approval": True},
        "dependsOn": ["draft"],
    }
    assert body["steps"][2]["dependsOn"] == ["ok"]
    parse_run(body, max_steps=10)  # the API takes it
    with pytest.raises(ValidationFailed, match=r"wait\.timeoutS"):
        run.wait("late", "later", timeout_s=0)
