"""`engine.dag.parse_added_steps`: the checks of steps a run adds to itself that need the
run's existing steps (no database: the existing steps are given)."""

from __future__ import annotations

from typing import Any

import pytest

from engine.dag import ExistingStep, parse_added_steps
from engine.errors import ValidationFailed
from engine.tools import load_tool_modules

load_tool_modules(["workers.tools.builtin"])

EXISTING = [
    ExistingStep("seed", "succeeded", []),
    ExistingStep("plan", "running", ["seed"]),
    ExistingStep("later", "pending", ["plan"]),
    ExistingStep("dead", "dead_letter", []),
]


def delay(name: str, *deps: str, **extra: Any) -> dict[str, Any]:
    return {"name": name, "tool": "DELAY", "input": {"ms": 0}, "dependsOn": list(deps), **extra}


def problems(steps: Any, *, max_steps: int = 100) -> list[tuple[str | None, str | None, str]]:
    with pytest.raises(ValidationFailed) as exc:
        parse_added_steps(steps, adder="plan", existing=EXISTING, max_steps=max_steps)
    return [(p["step"], p["field"], str(p["problem"])) for p in exc.value.problems]


def test_valid_steps_may_name_the_adder_succeeded_steps_and_each_other() -> None:
    spec = parse_added_steps(
        [
            delay("a", "plan", "seed"),
            {**delay("b", "a"), "input": {"ms": {"$ref": "steps.seed.output.tookMs"}}},
        ],
        adder="plan",
        existing=EXISTING,
        max_steps=100,
    )
    rows = spec.rows()
    assert [r["name"] for r in rows] == ["a", "b"]
    assert rows[1]["refSteps"] == ["seed"]  # seed is b's ancestor through a


def test_unfinished_or_failed_existing_dependencies_are_refused() -> None:
    found = problems([delay("a", "later"), delay("b", "dead")])
    assert [(s, f) for s, f, _ in found] == [("a", "dependsOn"), ("b", "dependsOn")]
    assert "step 'later' is pending" in found[0][2]
    assert "step 'dead' is dead_letter" in found[1][2]


def test_a_cycle_among_new_steps_is_named() -> None:
    found = problems([delay("a", "b", "plan"), delay("b", "a")])
    assert found[0][1] == "dependsOn" and "dependency cycle" in found[0][2]


def test_names_taken_the_limit_and_a_useless_any_failed() -> None:
    assert problems([delay("seed")]) == [
        ("seed", "name", "a step of this run already has this name")
    ]
    assert problems([delay("a"), delay("b")], max_steps=5)[0][:2] == (None, "addSteps")
    assert problems([delay("a", "seed", runIf="any_failed")])[0][:2] == ("a", "runIf")
    assert problems([])[0][:2] == (None, "addSteps")
    assert problems([{"name": "bad name!", "tool": "DELAY"}])[0][1] == "name"
    assert problems([{"tool": "DELAY"}])[0][:2] == ("#0", "name")


def test_the_planner_of_the_docs_adds_steps_that_validate() -> None:
    """docs/examples/planner.py (docs/planning.md) collects steps parse_added_steps accepts."""
    import asyncio
    import importlib.util
    from pathlib import Path

    from engine.tools import ToolContext, get_tool

    path = Path(__file__).resolve().parents[2] / "docs" / "examples" / "planner.py"
    spec = importlib.util.spec_from_file_location("docs_planner", path)
    assert spec is not None and spec.loader is not None
    spec.loader.exec_module(importlib.util.module_from_spec(spec))
    tool = get_tool("PLAN_TOPICS")
    ctx = ToolContext(run_id="r", step_name="plan", attempt=1, idempotency_key="r:plan")
    output = asyncio.run(tool.fn(tool.parse_input({"topics": ["a", "b"]}), ctx))
    assert output == {"topics": ["a", "b"], "planned": 3}
    added = parse_added_steps(
        ctx.added_steps, adder="plan", existing=[ExistingStep("plan", "running", [])], max_steps=10
    )
    assert [s.name for s in added.steps] == ["research.0", "research.1", "summary"]
    refused = ToolContext(run_id="r", step_name="plan", attempt=1, idempotency_key="r:plan")
    asyncio.run(tool.fn(tool.parse_input({"topics": ["a"], "after": ["nope"]}), refused))
    with pytest.raises(ValidationFailed, match="unknown dependency 'nope'"):
        parse_added_steps(
            refused.added_steps,
            adder="plan",
            existing=[ExistingStep("plan", "running", [])],
            max_steps=10,
        )


def test_add_steps_collects_calls_and_refuses_a_step_that_is_not_a_mapping() -> None:
    from engine.tools import ToolContext

    ctx = ToolContext(run_id="r", step_name="plan", attempt=1, idempotency_key="r:plan")
    ctx.add_steps([delay("a")])
    ctx.add_steps([delay("b", "a")])
    with pytest.raises(TypeError, match="must be a mapping, not str"):
        ctx.add_steps([delay("c"), "d"])  # type: ignore[list-item]
    assert [s["name"] for s in ctx.added_steps] == ["a", "b"]  # nothing of the refused call


def test_a_child_run_cannot_add_a_step_of_kind_run() -> None:
    child = {"name": "sub", "run": {"steps": [delay("x")]}, "dependsOn": ["plan"]}
    spec = parse_added_steps([child], adder="plan", existing=EXISTING, max_steps=100)
    assert spec.rows()[0]["run"] == {"steps": [delay("x")]}  # depth 1: accepted
    with pytest.raises(ValidationFailed) as exc:
        parse_added_steps(
            [child], adder="plan", existing=EXISTING, max_steps=100, in_child_run=True
        )
    assert [(p["step"], p["field"]) for p in exc.value.problems] == [("sub", "run")]


def test_a_wait_step_cannot_be_added() -> None:
    found = problems([delay("a", "plan"), {"name": "ok", "wait": {"signal": "go", "timeoutS": 60}}])
    assert found == [
        ("ok", "wait", "a wait step cannot be added by a step: submit it with the run")
    ]
