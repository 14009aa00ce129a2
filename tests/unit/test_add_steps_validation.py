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
