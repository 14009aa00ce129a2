"""The run validator: every bad graph of DESIGN is refused with the step and the problem."""

from __future__ import annotations

from typing import Any

import pytest

from engine.dag import parse_run
from engine.errors import ValidationFailed
from engine.tools import load_tool_modules

load_tool_modules(["workers.tools.builtin"])


def delay(name: str, *deps: str, **extra: Any) -> dict[str, Any]:
    return {"name": name, "tool": "DELAY", "input": {"ms": 0}, "dependsOn": list(deps), **extra}


def problems(body: Any, max_steps: int = 100) -> list[dict[str, Any]]:
    with pytest.raises(ValidationFailed) as info:
        parse_run(body, max_steps=max_steps)
    return info.value.problems


def test_valid_diamond_parses_with_defaults() -> None:
    spec = parse_run(
        {
            "goal": "g",
            "steps": [delay("a"), delay("b", "a"), delay("c", "a"), delay("d", "b", "c")],
        },
        max_steps=10,
    )
    assert [s.name for s in spec.steps] == ["a", "b", "c", "d"]
    assert spec.steps[3].depends_on == ["b", "c"]
    assert spec.steps[0].max_attempts == 3 and spec.steps[0].idempotent is True


def test_cycle_is_named() -> None:
    [p] = problems({"steps": [delay("a", "c"), delay("b", "a"), delay("c", "b")]})
    assert p["field"] == "dependsOn"
    assert "cycle" in p["problem"]
    assert {"a", "b", "c"} <= set(p["problem"].replace("->", " ").split())


def test_unknown_dependency() -> None:
    [p] = problems({"steps": [delay("a", "ghost")]})
    assert p == {"step": "a", "field": "dependsOn", "problem": "unknown dependency 'ghost'"}


def test_self_dependency() -> None:
    [p] = problems({"steps": [delay("a", "a")]})
    assert p["step"] == "a" and "itself" in p["problem"]


def test_duplicate_name() -> None:
    ps = problems({"steps": [delay("a"), delay("a")]})
    assert {"step": "a", "field": "name", "problem": "duplicate step name"} in ps


def test_unknown_tool() -> None:
    [p] = problems({"steps": [{"name": "x", "tool": "NOPE", "input": {}}]})
    assert p["step"] == "x" and p["field"] == "tool" and "NOPE" in p["problem"]


def test_input_refused_by_tool_schema() -> None:
    ps = problems({"steps": [{"name": "x", "tool": "DELAY", "input": {"ms": -5}}]})
    assert ps[0]["step"] == "x" and ps[0]["field"] == "input.ms"
    ps = problems({"steps": [{"name": "x", "tool": "DELAY", "input": {"ms": "soon"}}]})
    assert ps[0]["field"] == "input.ms"
    ps = problems({"steps": [{"name": "f", "tool": "HTTP_GET_JSON", "input": {"url": "ftp://x"}}]})
    assert ps[0]["step"] == "f" and ps[0]["field"].startswith("input")


def test_too_many_steps() -> None:
    [p] = problems({"steps": [delay(f"s{i}") for i in range(11)]}, max_steps=10)
    assert p["field"] == "steps" and "too many steps" in p["problem"]


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ([], "body"),
        ({}, "steps"),
        ({"steps": []}, "steps"),
        ({"steps": [delay("bad name")]}, "name"),
        ({"steps": [delay("a", maxAttempts=0)]}, "maxAttempts"),
        ({"steps": [delay("a", timeoutMs=0)]}, "timeoutMs"),
        ({"steps": [delay("a", surprise=1)]}, "surprise"),
        ({"steps": [delay("a")], "idempotencyKey": ""}, "idempotencyKey"),
    ],
)
def test_field_errors_name_the_field(body: Any, field: str) -> None:
    ps = problems(body)
    assert any(p["field"] == field for p in ps), ps


def test_every_problem_is_reported_at_once() -> None:
    ps = problems({"steps": [delay("a", "x"), {"name": "b", "tool": "NOPE", "input": {}}]})
    assert {p["step"] for p in ps} == {"a", "b"}


def test_fingerprint_is_of_the_run_not_its_spelling() -> None:
    base = {"goal": "g", "steps": [delay("a"), delay("b", "a")], "startAt": "2030-01-01T00:00Z"}
    spelled = {
        "startAt": "2030-01-01T02:00:00+02:00",
        "steps": [{**delay("a"), "maxAttempts": 3, "idempotent": True}, delay("b", "a")],
        "priority": 0,
        "idempotencyKey": "not part of it",
        "goal": "g",
    }
    fingerprint = parse_run(base, max_steps=10).fingerprint()
    assert len(fingerprint) == 64 and int(fingerprint, 16) >= 0
    assert parse_run(spelled, max_steps=10).fingerprint() == fingerprint
    for change in ({"goal": "h"}, {"priority": 1}, {"steps": [delay("a")]}):
        assert parse_run({**base, **change}, max_steps=10).fingerprint() != fingerprint
