"""``delayMs`` before anything is written: its validation (422 problems naming the step and
the field), the row `insert_steps` reads, the fingerprint of runs without it, and what a reset
(replay, manual retry) plans for a step with a delay."""

from __future__ import annotations

from typing import Any

import pytest

from engine.dag import MAX_DELAY_MS, parse_run
from engine.errors import ValidationFailed
from engine.rules import GraphStep, plan_reset
from engine.tools import load_tool_modules

load_tool_modules(["workers.tools.builtin"])


def delay(name: str, *deps: str, **extra: Any) -> dict[str, Any]:
    return {"name": name, "tool": "DELAY", "input": {"ms": 1}, "dependsOn": list(deps), **extra}


@pytest.mark.parametrize("bad", [-1, MAX_DELAY_MS + 1, 1.5, 1.0, "1000", True, [], {}])
def test_a_bad_delay_is_refused_naming_the_step_and_field(bad: Any) -> None:
    with pytest.raises(ValidationFailed) as info:
        parse_run({"steps": [delay("a"), delay("b", "a", delayMs=bad)]}, max_steps=10)
    assert [(p["step"], p["field"]) for p in info.value.problems] == [("b", "delayMs")]


def test_a_delay_is_stored_and_no_delay_leaves_the_row_and_fingerprint_alone() -> None:
    spec = parse_run(
        {"steps": [delay("a", delayMs=0), delay("b", "a", delayMs=MAX_DELAY_MS), delay("c")]},
        max_steps=10,
    )
    rows = {r["name"]: r for r in spec.rows()}
    assert "delayMs" not in rows["a"] and "delayMs" not in rows["c"]  # 0 sleeps no time
    assert rows["b"]["delayMs"] == MAX_DELAY_MS
    plain = parse_run({"idempotencyKey": "k", "steps": [delay("a")]}, max_steps=10)
    zero = parse_run({"idempotencyKey": "k", "steps": [delay("a", delayMs=0)]}, max_steps=10)
    null = parse_run({"idempotencyKey": "k", "steps": [delay("a", delayMs=None)]}, max_steps=10)
    slept = parse_run({"idempotencyKey": "k", "steps": [delay("a", delayMs=5)]}, max_steps=10)
    assert plain.fingerprint() == zero.fingerprint() == null.fingerprint()
    assert slept.fingerprint() != plain.fingerprint()
    # what main computed for this body before delayMs existed: a key used then still matches
    assert plain.fingerprint() == "6d9bcd8be3072cd6ecd441bb32fb32e9e6bb803b42e1f06b6edfe2da2a24bee6"


def step(i: int, status: str, **extra: Any) -> GraphStep:
    return GraphStep(
        id=i,
        name=f"s{i}",
        status=status,
        run_if=extra.get("run_if", "all_succeeded"),
        is_map=extra.get("is_map", False),
        map_width=extra.get("map_width"),
        map_parent_id=extra.get("map_parent_id"),
        delay_ms=extra.get("delay_ms"),
    )


def test_a_replay_parks_a_delayed_step_that_would_be_ready() -> None:
    steps = [step(1, "succeeded"), step(2, "succeeded", delay_ms=500), step(3, "succeeded")]
    plan, _ = plan_reset(
        steps, [(1, 2), (2, 3)], [2], follow=None, force_ready=False, delayed=False
    )
    assert [(r.id, r.status, r.remaining) for r in plan] == [(2, "pending", 0), (3, "pending", 1)]


def test_a_manual_retry_runs_a_delayed_dead_letter_at_once() -> None:
    steps = [step(1, "succeeded"), step(2, "dead_letter", delay_ms=500)]
    plan, _ = plan_reset(
        steps,
        [(1, 2)],
        [2],
        follow=frozenset({"pending", "skipped"}),
        force_ready=True,
        delayed=False,
    )
    assert [(r.id, r.status) for r in plan] == [(2, "ready")]


def test_a_kept_map_join_is_not_delayed_again() -> None:
    """A replay from a map child keeps the expansion: the map step waits for its child, and
    its join (when that child is done) is not a new sleep."""
    steps = [
        step(1, "succeeded", is_map=True, map_width=1, delay_ms=500),
        step(2, "succeeded", map_parent_id=1),
    ]
    plan, _ = plan_reset(steps, [(2, 1)], [2], follow=None, force_ready=False, delayed=False)
    assert [(r.id, r.status, r.remaining) for r in plan] == [(2, "ready", 0), (1, "pending", 1)]
