"""The chaos checker on steps a run adds to itself (``added_steps``, issue 15 part 5):
hand-made histories, clean and broken each way."""

from __future__ import annotations

from typing import Any

from tests.chaos.test_checker import R1, History, explain, kinds


def planned(submitted: dict[str, list[str]]) -> History:
    """A run whose run_created says how many steps were submitted (as the engine writes it)."""
    h = History()
    h.new_run(submitted)
    h.events[-1]["detail"] = {"steps": len(submitted)}
    return h


def add(h: History, names: dict[str, list[str]], *, status: str = "pending") -> None:
    """Insert step rows as insert_added_steps does (no event of their own when they wait)."""
    for name, deps in names.items():
        h._step_id += 1
        h.steps[(R1, name)] = {
            "id": h._step_id,
            "run_id": R1,
            "name": name,
            "status": status,
            "idempotent": True,
            "depends_on": deps,
        }


def plan_and_add(h: History, names: dict[str, list[str]]) -> int:
    """The plan step claims, adds `names` and succeeds in one transaction; they become ready."""
    t = h.claim("plan")
    add(h, names)
    h.ev("plan", "steps_added", t, to="running", steps=list(names))
    h.ev("plan", "step_succeeded", t)
    for name in names:
        h.ev(name, "step_ready")
    return t


def test_a_plan_that_adds_steps_checks_clean() -> None:
    h = planned({"plan": []})
    plan_and_add(h, {"a": ["plan"], "b": ["plan"]})
    h.succeed("a", "b")
    h.run_event("run_completed")
    report = h.check()
    assert report.ok, explain(report)


def test_added_steps_without_the_success_are_caught() -> None:
    h = planned({"plan": []})
    t = h.claim("plan")
    add(h, {"a": ["plan"]})
    h.ev("plan", "steps_added", t, to="running", steps=["a"])
    h.ev("plan", "step_lease_expired", t)
    report = h.check()
    assert "added_steps" in kinds(report), explain(report)
    assert any("not followed by the step's success" in v.detail for v in report.violations)


def test_a_named_step_missing_or_added_twice_or_from_nowhere_is_caught() -> None:
    h = planned({"plan": [], "plan2": []})
    plan_and_add(h, {"a": ["plan"]})
    t = h.claim("plan2")
    h.ev("plan2", "steps_added", t, to="running", steps=["a", "lost"])
    h.ev("plan2", "step_succeeded", t)
    add(h, {"stray": []}, status="ready")
    found: dict[str, Any] = {v.step: v.detail for v in h.check().violations}
    assert "added twice" in found["a"]
    assert "no such step" in found["lost"]
    assert "neither submitted with the run nor added" in found["stray"]
