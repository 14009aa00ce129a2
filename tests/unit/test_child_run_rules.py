"""Steps of kind run (child runs, issue 15 part 4): what POST /runs accepts and refuses,
and how a template's ``$param`` placeholders become the child's input. No database."""

from __future__ import annotations

from typing import Any

import pytest

from engine.dag import CHILD_RUN_TOOL, child_run_spec, parse_run, substitute_params
from engine.errors import ConfigError, ValidationFailed
from engine.tools import load_tool_modules, tool

load_tool_modules(["workers.tools.builtin"])

TEMPLATE = {
    "goal": "child",
    "steps": [{"name": "wait", "tool": "DELAY", "input": {"ms": {"$param": "ms"}}}],
}


def problems(body: dict[str, Any]) -> set[tuple[str | None, str]]:
    with pytest.raises(ValidationFailed) as exc:
        parse_run(body, max_steps=100)
    return {(p["step"], str(p["field"])) for p in exc.value.problems}


def run_step(**extra: Any) -> dict[str, Any]:
    return {"name": "sub", "input": {"ms": 5}, "run": TEMPLATE, **extra}


def test_a_run_step_is_stored_with_the_reserved_tool_and_its_template() -> None:
    spec = parse_run({"steps": [run_step()]}, max_steps=100)
    row = spec.rows()[0]
    assert row["tool"] == CHILD_RUN_TOOL and row["run"] == TEMPLATE
    # a plain run's fingerprint has no "run" key: runs keyed before 0011 keep theirs
    plain = parse_run({"steps": [{"name": "a", "tool": "DELAY", "input": {"ms": 1}}]}, max_steps=9)
    assert '"run"' not in str(plain.model_dump(by_alias=True, exclude_none=True))
    assert (
        plain.fingerprint()
        == parse_run(
            {"steps": [{"name": "a", "tool": "DELAY", "input": {"ms": 1}, "run": None}]},
            max_steps=9,
        ).fingerprint()
    )


@pytest.mark.parametrize(
    ("step", "expected"),
    [
        ({"name": "sub"}, {("sub", "tool")}),
        ({**run_step(), "tool": "DELAY"}, {("sub", "run")}),
        (run_step(timeoutMs=5), {("sub", "timeoutMs")}),
        (
            run_step(concurrencyKey="k", maxConcurrency=1),
            {("sub", "concurrencyKey"), ("sub", "maxConcurrency")},
        ),
        (run_step(map={"$ref": "steps.x.output"}), {("sub", "map")}),
        ({**run_step(), "input": {}}, {("sub", "run.steps.wait.input.ms")}),  # no key "ms"
        (
            {
                **run_step(),
                "run": {"steps": [{"name": "w", "tool": "DELAY", "input": {"ms": "x"}}]},
            },
            {("sub", "run.steps.w.input.ms")},
        ),
        ({**run_step(), "run": {"steps": []}}, {("sub", "run.steps")}),
        (
            {**run_step(), "run": {**TEMPLATE, "idempotencyKey": "k"}},
            {("sub", "run.idempotencyKey")},
        ),
        ({**run_step(), "run": {"steps": [run_step()]}}, {("sub", "run.steps.sub.run")}),
        ({"name": "x", "tool": "$run", "input": {}}, {("x", "tool")}),
    ],
)
def test_bad_run_steps_are_refused_naming_the_field(
    step: dict[str, Any], expected: set[Any]
) -> None:
    assert problems({"steps": [step]}) >= expected


def test_a_client_key_cannot_take_a_child_runs_prefix() -> None:
    body = {"idempotencyKey": "pgdag-child:x", "steps": [run_step()]}
    assert problems(body) == {(None, "idempotencyKey")}


def test_params_are_substituted_and_the_child_validated_again() -> None:
    assert substitute_params({"a": [{"$param": "x"}, {"$param": 1}]}, {"x": {"y": 2}}) == {
        "a": [{"y": 2}, {"$param": 1}]
    }
    spec = child_run_spec(TEMPLATE, {"ms": 7}, idempotency_key="k", goal="p", max_steps=10)
    assert spec.steps[0].input == {"ms": 7} and spec.idempotency_key == "k"
    assert spec.goal == "child"
    with pytest.raises(ValidationFailed) as exc:
        child_run_spec(TEMPLATE, {"ms": "soon"}, idempotency_key="k", goal="p", max_steps=10)
    assert exc.value.problems[0]["field"] == "input.ms"


def test_the_builder_builds_a_run_step() -> None:
    from engine.builder import Run, param

    child = Run("child")
    child.step("wait", "DELAY", ms=param("ms"))
    run = Run("parent")
    plan = run.step("plan", "DELAY", ms=1)
    sub = run.child_run("sub", child, ms=plan.output["tookMs"])
    run.step("after", "DELAY", ms=sub.output["outputs"]["wait"]["tookMs"])
    body = run.to_dict()
    assert body["steps"][1] == {
        "name": "sub",
        "input": {"ms": {"$ref": "steps.plan.output.tookMs"}},
        "dependsOn": ["plan"],
        "run": TEMPLATE,
    }
    assert parse_run(body, max_steps=10).rows()[1]["tool"] == CHILD_RUN_TOOL


def test_tools_cannot_take_a_reserved_name() -> None:
    with pytest.raises(ConfigError):
        tool("$run", dict)  # type: ignore[arg-type]
