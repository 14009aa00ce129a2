"""The DAG model: the shape of a submitted run and every check made before anything is written.

`parse_run(body, max_steps=...)` turns a decoded ``POST /runs`` body into a `RunSpec` or
raises `ValidationFailed` with every problem found, each naming the step (when there is one),
the field and the problem. Checks: field types and ranges, step names, duplicate names,
unknown dependencies, self-dependencies, cycles, unknown tools, inputs the tool's schema
refuses, and the step-count limit.
"""

from __future__ import annotations

import json
from collections import deque
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from engine.config import MAX_ATTEMPTS_DEFAULT
from engine.errors import UnknownTool, ValidationFailed
from engine.tools import get_tool

STEP_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}$"
MAX_TIMEOUT_MS = 24 * 3600 * 1000
MAX_ATTEMPTS_LIMIT = 100

Problem = dict[str, str | None]


class StepSpec(BaseModel):
    """One step of a submitted run (camelCase on the wire)."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    name: str = Field(pattern=STEP_NAME_PATTERN)
    tool: str = Field(min_length=1, max_length=128)
    input: dict[str, Any] = Field(default_factory=dict)
    depends_on: list[str] = Field(default_factory=list, alias="dependsOn", max_length=1000)
    max_attempts: int = Field(
        default=MAX_ATTEMPTS_DEFAULT, ge=1, le=MAX_ATTEMPTS_LIMIT, alias="maxAttempts"
    )
    timeout_ms: int | None = Field(default=None, ge=1, le=MAX_TIMEOUT_MS, alias="timeoutMs")
    idempotent: bool = True

    def to_row(self) -> dict[str, Any]:
        """The JSON object `insert_steps` reads for this step."""
        return {
            "name": self.name,
            "tool": self.tool,
            "input": self.input,
            "dependsOn": self.depends_on,
            "maxAttempts": self.max_attempts,
            "timeoutMs": self.timeout_ms,
            "idempotent": self.idempotent,
        }


class RunSpec(BaseModel):
    """A submitted run: a goal, an optional client idempotency key, and its steps."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    goal: str = Field(default="", max_length=2000)
    idempotency_key: str | None = Field(
        default=None, min_length=1, max_length=255, alias="idempotencyKey"
    )
    steps: list[StepSpec] = Field(min_length=1)

    def steps_json(self) -> str:
        """All steps as the JSON array `insert_steps` takes."""
        return json.dumps([s.to_row() for s in self.steps], separators=(",", ":"))


def _field_path(loc: tuple[int | str, ...]) -> str:
    return ".".join(str(part) for part in loc)


def _pydantic_problems(exc: ValidationError, body: Any) -> list[Problem]:
    problems: list[Problem] = []
    for err in exc.errors(include_url=False):
        loc = tuple(err["loc"])
        step: str | None = None
        field = _field_path(loc)
        if len(loc) >= 2 and loc[0] == "steps" and isinstance(loc[1], int):
            step = _step_name_at(body, loc[1])
            field = _field_path(loc[2:]) or "step"
        problems.append({"step": step, "field": field, "problem": err["msg"]})
    return problems


def _step_name_at(body: Any, index: int) -> str:
    try:
        name = body["steps"][index]["name"]
    except (KeyError, IndexError, TypeError):
        return f"#{index}"
    return name if isinstance(name, str) and name else f"#{index}"


def _find_cycle(steps: list[StepSpec]) -> list[str] | None:
    """Kahn's algorithm; on a cycle, walk one to report it as a path of names."""
    indegree = {s.name: len(set(s.depends_on)) for s in steps}
    children: dict[str, list[str]] = {s.name: [] for s in steps}
    for s in steps:
        for dep in set(s.depends_on):
            children[dep].append(s.name)
    queue = deque(name for name, n in indegree.items() if n == 0)
    seen = 0
    while queue:
        name = queue.popleft()
        seen += 1
        for child in children[name]:
            indegree[child] -= 1
            if indegree[child] == 0:
                queue.append(child)
    if seen == len(steps):
        return None
    # Every node left has a dependency that is also left: follow those back to a repeat.
    left = {name for name, n in indegree.items() if n > 0}
    by_name = {s.name: s for s in steps}
    path: list[str] = []
    current = next(iter(sorted(left)))
    while current not in path:
        path.append(current)
        current = next(d for d in by_name[current].depends_on if d in left)
    cycle = [*path[path.index(current) :], current]
    cycle.reverse()
    return cycle


def parse_run(body: Any, *, max_steps: int) -> RunSpec:
    """Validate a decoded ``POST /runs`` body and return the `RunSpec`.

    Raises `ValidationFailed` listing every problem found (``step``, ``field``, ``problem``).
    """
    if not isinstance(body, dict):
        raise ValidationFailed(
            [{"step": None, "field": "body", "problem": "must be a JSON object"}]
        )
    raw_steps = body.get("steps")
    if isinstance(raw_steps, list) and len(raw_steps) > max_steps:
        raise ValidationFailed(
            [
                {
                    "step": None,
                    "field": "steps",
                    "problem": f"too many steps: {len(raw_steps)} > the limit of {max_steps}"
                    " (PGDAG_MAX_STEPS)",
                }
            ]
        )
    try:
        spec = RunSpec.model_validate(body)
    except ValidationError as exc:
        raise ValidationFailed(_pydantic_problems(exc, body)) from None

    problems: list[Problem] = []
    names: set[str] = set()
    for step in spec.steps:
        if step.name in names:
            problems.append({"step": step.name, "field": "name", "problem": "duplicate step name"})
        names.add(step.name)
    for step in spec.steps:
        for dep in step.depends_on:
            if dep == step.name:
                problems.append(
                    {
                        "step": step.name,
                        "field": "dependsOn",
                        "problem": "a step cannot depend on itself",
                    }
                )
            elif dep not in names:
                problems.append(
                    {
                        "step": step.name,
                        "field": "dependsOn",
                        "problem": f"unknown dependency {dep!r}",
                    }
                )
        if len(set(step.depends_on)) != len(step.depends_on):
            problems.append(
                {"step": step.name, "field": "dependsOn", "problem": "lists a dependency twice"}
            )
        try:
            tool = get_tool(step.tool)
        except UnknownTool as exc:
            problems.append({"step": step.name, "field": "tool", "problem": str(exc)})
            continue
        try:
            tool.parse_input(step.input)
        except ValidationError as exc:
            for err in exc.errors(include_url=False):
                sub = _field_path(tuple(err["loc"]))
                problems.append(
                    {
                        "step": step.name,
                        "field": f"input.{sub}" if sub else "input",
                        "problem": f"{step.tool}: {err['msg']}",
                    }
                )
    if not problems:
        cycle = _find_cycle(spec.steps)
        if cycle is not None:
            problems.append(
                {
                    "step": cycle[0],
                    "field": "dependsOn",
                    "problem": "dependency cycle: " + " -> ".join(cycle),
                }
            )
    if problems:
        raise ValidationFailed(problems)
    return spec
