"""Submit-time checks of references, maps, trigger rules and scheduling fields; the trigger
rules and the reset planner as pure functions."""

from __future__ import annotations

from typing import Any

import pytest

from engine.dag import parse_ref, parse_run
from engine.errors import ValidationFailed
from engine.rules import GraphStep, decide, plan_reset
from engine.tools import load_tool_modules

load_tool_modules(["workers.tools.builtin"])


def delay(name: str, *deps: str, **extra: Any) -> dict[str, Any]:
    return {"name": name, "tool": "DELAY", "input": {"ms": 1}, "dependsOn": list(deps), **extra}


def fetch(name: str, url: Any, *deps: str, **extra: Any) -> dict[str, Any]:
    return {
        "name": name,
        "tool": "HTTP_GET_JSON",
        "input": {"url": url},
        "dependsOn": list(deps),
        **extra,
    }


def problems(body: dict[str, Any]) -> list[dict[str, Any]]:
    with pytest.raises(ValidationFailed) as info:
        parse_run(body, max_steps=100)
    return info.value.problems


def test_reference_to_an_ancestor_is_accepted_and_parsed() -> None:
    spec = parse_run(
        {
            "steps": [
                delay("a"),
                delay("b", "a"),
                fetch("c", {"$ref": "steps.a.output.body.next"}, "b"),
            ]
        },
        max_steps=10,
    )
    row = spec.rows()[2]
    assert row["refs"] == [
        {
            "at": ["url"],
            "path": ["steps", "a", "output", "body", "next"],
            "ref": "steps.a.output.body.next",
            "field": "input.url",
        }
    ]
    assert row["refSteps"] == ["a"]


@pytest.mark.parametrize(
    ("steps", "field", "fragment"),
    [
        ([delay("a"), fetch("c", {"$ref": "steps.a.output"})], "input.url", "not an ancestor"),
        ([delay("a"), fetch("c", {"$ref": "steps.c.output"}, "a")], "input.url", "not an ancestor"),
        ([delay("a"), fetch("c", {"$ref": "steps.zz.output"}, "a")], "input.url", "names no step"),
        ([delay("a"), fetch("c", {"$ref": "nope.x"}, "a")], "input.url", "must start with"),
        ([delay("a"), fetch("c", {"$ref": "steps.a.output..x"}, "a")], "input.url", "empty"),
        ([delay("a"), fetch("c", {"$ref": 5}, "a")], "input.url", "must be a string"),
        ([delay("a"), fetch("c", {"$ref": "item"}, "a")], "input.url", "only in a map step"),
        (
            [delay("a"), fetch("c", {"$ref": "steps.a.output", "x": 1}, "a")],
            "input.url",
            "no other keys",
        ),
        ([delay("a"), fetch("c", {"$ref": "steps.a.status.x"}, "a")], "input.url", "no fields"),
        ([delay("a"), delay("m", "a", map={"$ref": "steps.b.output"})], "map", "names no step"),
        ([delay("a"), delay("m", map={"$ref": "steps.a.output"})], "map", "not an ancestor"),
        ([delay("a"), delay("m", "a", map={"$ref": "item"})], "map", "must name a step"),
        ([delay("a"), delay("m", "a", map=["x"])], "map", "valid dictionary"),
        ([delay("a", runIf="some_failed")], "runIf", "all_succeeded"),
        ([delay("a", concurrencyKey="k")], "concurrencyKey", "needs a maxConcurrency"),
        ([delay("a", maxConcurrency=2)], "maxConcurrency", "needs a concurrencyKey"),
        (
            [
                delay("a", concurrencyKey="k", maxConcurrency=2),
                delay("b", concurrencyKey="k", maxConcurrency=3),
            ],
            "maxConcurrency",
            "one key has one limit",
        ),
    ],
)
def test_bad_references_and_fields_are_refused(
    steps: list[dict[str, Any]], field: str, fragment: str
) -> None:
    found = problems({"steps": steps})
    assert any(p["field"] == field and fragment in p["problem"] for p in found), found


def test_run_level_fields() -> None:
    spec = parse_run(
        {"priority": 7, "startAt": "2030-01-01T00:00:00Z", "steps": [delay("a")]}, max_steps=10
    )
    assert spec.priority == 7 and spec.start_at is not None
    found = problems({"startAt": "2030-01-01T00:00:00", "steps": [delay("a")]})
    assert found[0]["field"] == "startAt" and "timezone" in found[0]["problem"]
    found = problems({"priority": 10**9, "steps": [delay("a")]})
    assert found[0]["field"] == "priority"


def test_a_map_step_may_use_item_and_index_and_its_schema_is_checked_around_them() -> None:
    spec = parse_run(
        {
            "steps": [
                delay("list"),
                {
                    "name": "each",
                    "tool": "DELAY",
                    "input": {"ms": {"$ref": "item.wait"}},
                    "map": {"$ref": "steps.list.output.items"},
                    "dependsOn": ["list"],
                },
            ]
        },
        max_steps=10,
    )
    row = spec.rows()[1]
    assert row["mapPath"] == ["steps", "list", "output", "items"]
    assert row["refs"][0]["path"] == ["item", "wait"]
    # a field that is not a reference is still checked against the tool's schema
    found = problems(
        {
            "steps": [
                delay("list"),
                {
                    "name": "each",
                    "tool": "DELAY",
                    "input": {"ms": -1, "extra": {"$ref": "index"}},
                    "map": {"$ref": "steps.list.output"},
                    "dependsOn": ["list"],
                },
            ]
        }
    )
    assert [p["field"] for p in found] == ["input.ms", "input.extra"]


def test_step_names_with_dots_resolve_to_the_longest_name() -> None:
    assert parse_ref("steps.a.b.output.x", {"a", "a.b"}) == ["steps", "a.b", "output", "x"]
    assert parse_ref("steps.a.output.b", {"a", "a.b"}) == ["steps", "a", "output", "b"]
    assert parse_ref("index", set()) == ["index"]


def test_references_are_private_to_the_engine() -> None:
    """A client cannot smuggle a parsed reference list past the checks."""
    found = problems({"steps": [{**delay("a"), "refs": [{"at": [], "path": ["x"]}]}]})
    assert found[0]["field"] == "refs"


@pytest.mark.parametrize(
    ("rule", "remaining", "failed", "expected"),
    [
        ("all_succeeded", 0, 0, "ready"),
        ("all_succeeded", 2, 0, "pending"),
        ("all_succeeded", 2, 1, "skipped"),  # at once, without waiting for the others
        ("all_done", 1, 1, "pending"),
        ("all_done", 0, 3, "ready"),
        ("all_done", 0, 0, "ready"),
        ("any_failed", 1, 1, "pending"),
        ("any_failed", 0, 1, "ready"),
        ("any_failed", 0, 0, "skipped"),
    ],
)
def test_decide(rule: str, remaining: int, failed: int, expected: str) -> None:
    assert decide(rule, remaining=remaining, failed=failed) == expected


def test_decide_refuses_an_unknown_rule() -> None:
    with pytest.raises(ValueError, match="unknown runIf"):
        decide("sometimes", remaining=0, failed=0)


def step(i: int, status: str, rule: str = "all_succeeded", **extra: Any) -> GraphStep:
    return GraphStep(
        id=i,
        name=f"s{i}",
        status=status,
        run_if=rule,
        is_map=extra.get("is_map", False),
        map_width=extra.get("map_width"),
        map_parent_id=extra.get("map_parent_id"),
    )


def test_retry_plan_keeps_a_step_another_dead_letter_still_blocks() -> None:
    """1 and 2 dead; 3 depends on both (skipped); 4 on 3 (skipped). Retrying 1 leaves 3
    skipped (2 is still dead), so 4, which waits on 3 only, must not wait forever: it stays
    skipped too."""
    steps = [step(1, "dead_letter"), step(2, "dead_letter"), step(3, "skipped"), step(4, "skipped")]
    plan, dropped = plan_reset(
        steps,
        [(1, 3), (2, 3), (3, 4)],
        [1],
        follow=frozenset({"pending", "skipped"}),
        force_ready=True,
        delayed=False,
    )
    assert dropped == []
    assert [(r.id, r.status, r.remaining, r.failed) for r in plan] == [
        (1, "ready", 0, 0),
        (3, "skipped", 1, 1),
        (4, "skipped", 0, 1),
    ]


def test_replay_plan_re_expands_a_map_unless_started_from_its_child() -> None:
    steps = [
        step(1, "succeeded"),
        step(2, "succeeded", is_map=True, map_width=2),
        step(3, "succeeded", map_parent_id=2),
        step(4, "succeeded", map_parent_id=2),
        step(5, "succeeded"),
    ]
    edges = [(1, 2), (3, 2), (4, 2), (2, 5)]
    plan, dropped = plan_reset(steps, edges, [1], follow=None, force_ready=False, delayed=False)
    assert dropped == [3, 4]
    assert [(r.id, r.status, r.unexpand) for r in plan] == [
        (1, "ready", False),
        (2, "pending", True),
        (5, "pending", False),
    ]
    plan, dropped = plan_reset(steps, edges, [4], follow=None, force_ready=False, delayed=False)
    assert dropped == []
    assert [(r.id, r.status, r.remaining, r.unexpand) for r in plan] == [
        (4, "ready", 0, False),
        (2, "pending", 1, False),  # waits for its one replayed child, not its parent
        (5, "pending", 1, False),
    ]


def test_replay_plan_of_a_delayed_run_keeps_roots_waiting() -> None:
    plan, _ = plan_reset(
        [step(1, "succeeded")], [], [1], follow=None, force_ready=False, delayed=True
    )
    assert plan[0].status == "pending" and plan[0].remaining == 0
