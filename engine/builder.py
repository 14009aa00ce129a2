"""Define a run in Python; it compiles to exactly the JSON ``POST /runs`` takes.

    run = Run(goal="read a feed and its pages")
    feed = run.step("feed", "HTTP_GET_JSON", url="https://example.org/feed.json")
    pages = run.step(
        "pages", "HTTP_GET_JSON", map=feed.output["body"]["pages"], url=item["url"]
    )
    run.step("pause", "DELAY", ms=500, depends_on=[pages])
    body = run.to_dict()  # {"goal": ..., "steps": [{"name": "feed", ...}, ...]}

The builder only builds data (STYLE.md, after Hatchet v1): a `Step` is a typed handle for
``dependsOn`` (``depends_on=[feed]``) and for references. ``feed.output["body"]["pages"]`` is
a `Ref` that compiles to ``{"$ref": "steps.feed.output.body.pages"}``; `item` and `index`
are the map child's element and position (``{"$ref": "item.url"}``, ``{"$ref": "index"}``).

A step of kind run (`Run.child_run`) takes another `Run` as its child-run template; the
template's inputs read the run step's resolved input through `param` (``{"$param": key}``).

A reference may name only an ancestor of the step (`engine.dag`), so a step that refers to
one that is not yet an ancestor through ``depends_on`` gets it added to its ``dependsOn``
(after the ones given, in the order the references appear). A step already an ancestor is
not added again: a direct edge would change what ``runIf`` rules see.

Each step is checked as it is added, by the API's own model (`engine.dag.StepSpec`), so a
bad field fails at the line that wrote it: `ValidationFailed` naming the step and the field.
Graph checks that need the tool registry (unknown tools, inputs a tool's schema refuses)
are the API's; `engine.dag.parse_run` runs them all on `Run.to_dict`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping
from datetime import datetime
from typing import Any

from pydantic import ValidationError

from engine.dag import RunSpec, StepSpec
from engine.errors import ValidationFailed

_PLAIN = (str, int, float, bool, type(None))


class Ref:
    """A reference to a value known only when a step is claimed: ``{"$ref": path}``.

    Build one from a step (``step.output``, ``step.status``, ``step.error``) or from `item`
    / `index`; index it with ``ref["key"]`` or ``ref[0]`` (negative counts from the end)
    to go deeper. Raises `ValueError` for a key the path syntax cannot spell (empty, or
    holding a dot) and `TypeError` for a key that is neither str nor int, or for going
    below ``status``, ``error`` or ``index``.
    """

    __slots__ = ("_leaf", "path", "step")

    def __init__(self, path: str, step: Step | None = None, *, leaf: bool = False) -> None:
        self.path = path
        self.step = step
        self._leaf = leaf

    def __getitem__(self, key: str | int) -> Ref:
        if self._leaf:
            raise TypeError(f"{self.path} has no fields (only steps.<name>.output and item do)")
        if isinstance(key, bool) or not isinstance(key, str | int):
            raise TypeError(f"{self.path}[{key!r}]: a key is a str or an int")
        text = str(key)
        if text == "" or "." in text:
            raise ValueError(
                f"{self.path}[{key!r}]: a key that is empty or contains a dot cannot be "
                "referenced (the $ref path syntax has no escape)"
            )
        return Ref(f"{self.path}.{text}", self.step)

    def to_json(self) -> dict[str, str]:
        """``{"$ref": path}``."""
        return {"$ref": self.path}

    def __repr__(self) -> str:
        return f"Ref({self.path!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Ref) and (other.path, other.step) == (self.path, self.step)

    def __hash__(self) -> int:
        return hash(self.path)


item = Ref("item")
"""A map child's element (``{"$ref": "item"}``); ``item["url"]`` goes into it."""

index = Ref("index", leaf=True)
"""A map child's position in its map step's list (``{"$ref": "index"}``)."""


class Param:
    """A child-run template's placeholder for a key of its run step's input:
    ``{"$param": key}``, replaced by that key's value (its references resolved) when the
    child run is created. Build one with `param`."""

    __slots__ = ("key",)

    def __init__(self, key: str) -> None:
        self.key = key

    def to_json(self) -> dict[str, str]:
        """``{"$param": key}``."""
        return {"$param": self.key}

    def __repr__(self) -> str:
        return f"param({self.key!r})"


def param(key: str) -> Param:
    """In a child-run template (the `Run` given to `Run.child_run`): the value of `key` of
    the run step's input. Raises `ValueError` for an empty key."""
    if not key:
        raise ValueError("a $param names a key of the run step's input: not empty")
    return Param(key)


class Step:
    """A step added to a `Run` by `Run.step`: its `name`, and references to what it will
    have produced (`output`, `status`, `error`) for later steps' inputs. Pass it in another
    step's ``depends_on``. `spec` is its JSON object as ``POST /runs`` takes it."""

    def __init__(self, run: Run, name: str, spec: dict[str, Any], ancestors: set[str]) -> None:
        self.run = run
        self.name = name
        self.spec = spec
        self.ancestors = ancestors  # every step reachable through dependsOn

    @property
    def output(self) -> Ref:
        """What the step returned: ``{"$ref": "steps.<name>.output"}``; index it to go in."""
        return Ref(f"steps.{self.name}.output", self)

    @property
    def status(self) -> Ref:
        """How the step ended (``succeeded``, ``dead_letter``, ``skipped``...)."""
        return Ref(f"steps.{self.name}.status", self, leaf=True)

    @property
    def error(self) -> Ref:
        """The step's last error (null when it succeeded)."""
        return Ref(f"steps.{self.name}.error", self, leaf=True)

    def __repr__(self) -> str:
        return f"Step({self.name!r}, {self.spec.get('tool', '$run')!r})"


def _problem(step: str, field: str, problem: str) -> ValidationFailed:
    return ValidationFailed([{"step": step, "field": field, "problem": problem}])


def _compile(value: Any, at: str, step: str, refs: list[tuple[Ref, str]]) -> Any:
    """`value` as JSON data, each `Ref` replaced by its ``{"$ref": ...}`` and appended to
    `refs` with the field it is at. Raises `ValidationFailed` naming the field for a value
    JSON cannot hold."""
    if isinstance(value, Ref):
        refs.append((value, at))
        return value.to_json()
    if isinstance(value, Param):
        return value.to_json()
    if isinstance(value, _PLAIN):
        if isinstance(value, float) and not math.isfinite(value):
            raise _problem(step, at, f"{value} is not a JSON number")
        return value
    if isinstance(value, Mapping):
        out: dict[str, Any] = {}
        for key, child in value.items():
            if not isinstance(key, str):
                raise _problem(step, at, f"key {key!r} is not a string (JSON keys are)")
            out[key] = _compile(child, f"{at}.{key}", step, refs)
        return out
    if isinstance(value, list | tuple):
        return [_compile(child, f"{at}.{i}", step, refs) for i, child in enumerate(value)]
    raise _problem(
        step,
        at,
        f"a {type(value).__name__} is not JSON (use str, int, float, bool, None, "
        "dict, list or a Ref)",
    )


class Run:
    """A run being defined: its `goal`, optional `idempotency_key` (same key, same run),
    `priority` (higher is claimed first; -1,000,000..1,000,000) and `start_at` (an aware
    `datetime`, or an ISO 8601 string with an offset: nothing starts before it). Add steps
    with `step`; `to_dict` / `to_json` give the ``POST /runs`` body.

    Raises `ValidationFailed` naming the field for a bad value (checked by the API's model,
    `engine.dag.RunSpec`).
    """

    def __init__(
        self,
        goal: str = "",
        *,
        idempotency_key: str | None = None,
        priority: int | None = None,
        start_at: datetime | str | None = None,
    ) -> None:
        head: dict[str, Any] = {"goal": goal}
        if idempotency_key is not None:
            head["idempotencyKey"] = idempotency_key
        if priority is not None:
            head["priority"] = priority
        if isinstance(start_at, datetime):
            if start_at.tzinfo is None or start_at.utcoffset() is None:
                raise ValidationFailed(
                    [
                        {
                            "step": None,
                            "field": "startAt",
                            "problem": "a datetime without a time zone is ambiguous; "
                            "give one with tzinfo (e.g. datetime.now(UTC))",
                        }
                    ]
                )
            head["startAt"] = start_at.isoformat()
        elif start_at is not None:
            head["startAt"] = start_at
        # The run's own fields, checked now with a placeholder step (steps come later).
        probe = {**head, "steps": [{"name": "probe", "tool": "probe"}]}
        try:
            RunSpec.model_validate(probe)
        except ValidationError as exc:
            raise ValidationFailed(
                [
                    {
                        "step": None,
                        "field": ".".join(str(p) for p in err["loc"]),
                        "problem": err["msg"],
                    }
                    for err in exc.errors(include_url=False)
                ]
            ) from None
        self._head = head
        self.steps: dict[str, Step] = {}

    def step(
        self,
        name: str,
        tool: str,
        *,
        input: Mapping[str, Any] | None = None,
        depends_on: Iterable[Step | str] = (),
        run_if: str | None = None,
        map: Ref | None = None,
        max_attempts: int | None = None,
        timeout_ms: int | None = None,
        idempotent: bool | None = None,
        concurrency_key: str | None = None,
        max_concurrency: int | None = None,
        **fields: Any,
    ) -> Step:
        """Add a step and return it.

        `name` is unique in the run; `tool` a registered tool. The tool's input is `input`
        (a mapping) and/or the other keyword arguments (``url=...``, ``ms=...``): use
        `input` for a field whose name is one of this method's parameters. Any value may
        be a `Ref`, at any depth. `depends_on`: earlier steps of this run (`Step` objects,
        or their names). `run_if`: ``all_succeeded`` (default), ``all_done`` or
        ``any_failed``. `map`: a `Ref` to a step's output list: one child per element, whose
        input may use `item` and `index`. `max_attempts` (1..100, default 3), `timeout_ms`
        (per attempt), `idempotent` (False: never re-run automatically),
        `concurrency_key` with `max_concurrency` (at most that many steps of the key run at
        once, across runs).

        Steps referred to (in the input or `map`) that are not yet ancestors are added to
        ``dependsOn``. Raises `ValidationFailed` naming the step and the field for a bad
        value, a duplicate name, a dependency or reference outside this run, `item` /
        `index` outside a map step; `TypeError` for a `depends_on` item that is neither.
        """
        if name in self.steps:
            raise _problem(name, "name", "duplicate step name")
        deps: list[str] = []
        for dep in depends_on:
            dep_name = self._own_step(dep, name, "dependsOn")
            if dep_name not in deps:
                deps.append(dep_name)
        refs: list[tuple[Ref, str]] = []
        twice = sorted(set(input or {}) & set(fields))
        if twice:
            raise _problem(name, f"input.{twice[0]}", "given both in input= and as a keyword")
        given = {**(input or {}), **fields}
        spec: dict[str, Any] = {
            "name": name,
            "tool": tool,
            "input": _compile(given, "input", name, refs),
        }
        if map is not None:
            if (
                not isinstance(map, Ref)
                or map.step is None
                or not map.path.startswith(f"steps.{map.step.name}.output")
            ):
                raise _problem(
                    name, "map", f"must be a step's output, like feed.output['items'], not {map!r}"
                )
            refs.append((map, "map"))
            spec["map"] = map.to_json()
        ancestors: set[str] = set()
        for dep_name in deps:
            ancestors |= {dep_name, *self.steps[dep_name].ancestors}
        for ref, at in refs:
            if ref.step is None:
                if map is None and ref.path.split(".")[0] in ("item", "index"):
                    raise _problem(name, at, f"{ref.path} exists only in a map step (pass map=...)")
                continue
            ref_name = self._own_step(ref.step, name, at)
            if ref_name not in ancestors:
                deps.append(ref_name)
                ancestors |= {ref_name, *self.steps[ref_name].ancestors}
        if deps:
            spec["dependsOn"] = deps
        optional = {
            "runIf": run_if,
            "maxAttempts": max_attempts,
            "timeoutMs": timeout_ms,
            "idempotent": idempotent,
            "concurrencyKey": concurrency_key,
            "maxConcurrency": max_concurrency,
        }
        spec.update((k, v) for k, v in optional.items() if v is not None)
        try:
            StepSpec.model_validate(spec)
        except ValidationError as exc:
            raise ValidationFailed(
                [
                    {
                        "step": name,
                        "field": ".".join(str(p) for p in err["loc"]) or "step",
                        "problem": err["msg"],
                    }
                    for err in exc.errors(include_url=False)
                ]
            ) from None
        step = Step(self, name, spec, ancestors)
        self.steps[name] = step
        return step

    def wait(
        self,
        name: str,
        signal: str,
        *,
        timeout_s: int,
        approval: bool = False,
        depends_on: Iterable[Step | str] = (),
        run_if: str | None = None,
        max_attempts: int | None = None,
    ) -> Step:
        """Add a wait step and return it: it runs no tool, and succeeds with the payload of
        the signal `signal` sent to the run (``POST /runs/{runId}/signals/{signal}``), which
        later steps read as ``step.output``. `timeout_s` (1..2,592,000 seconds, counted from
        when its dependencies are done) fails its attempt when no signal came; `max_attempts`
        waits again that many times in all. `approval`: shown with Approve / Reject in the
        dashboard (a payload ``{"approved": false}`` dead-letters it). Raises
        `ValidationFailed` like `step`."""
        if name in self.steps:
            raise _problem(name, "name", "duplicate step name")
        deps: list[str] = []
        for dep in depends_on:
            dep_name = self._own_step(dep, name, "dependsOn")
            if dep_name not in deps:
                deps.append(dep_name)
        wait: dict[str, Any] = {"signal": signal, "timeoutS": timeout_s}
        if approval:
            wait["approval"] = True
        spec: dict[str, Any] = {"name": name, "wait": wait}
        if deps:
            spec["dependsOn"] = deps
        optional = {"runIf": run_if, "maxAttempts": max_attempts}
        spec.update((k, v) for k, v in optional.items() if v is not None)
        try:
            StepSpec.model_validate(spec)
        except ValidationError as exc:
            raise ValidationFailed(
                [
                    {
                        "step": name,
                        "field": ".".join(str(p) for p in err["loc"]) or "step",
                        "problem": err["msg"],
                    }
                    for err in exc.errors(include_url=False)
                ]
            ) from None
        ancestors: set[str] = set()
        for dep_name in deps:
            ancestors |= {dep_name, *self.steps[dep_name].ancestors}
        step = Step(self, name, spec, ancestors)
        self.steps[name] = step
        return step

    def child_run(
        self,
        name: str,
        template: Run,
        *,
        input: Mapping[str, Any] | None = None,
        depends_on: Iterable[Step | str] = (),
        run_if: str | None = None,
        max_attempts: int | None = None,
        idempotent: bool | None = None,
        **fields: Any,
    ) -> Step:
        """Add a step of kind run: it starts a child run from `template` (another `Run`,
        whose inputs may use `param`) and succeeds with ``{"runId", "outputs": {<child
        step>: <output>}}`` when the child completes (docs/child-runs.md). Its input is
        `input` and/or the keyword arguments, references allowed, as for `step`.

        Raises `ValidationFailed` as `step` does; the template itself is checked by the API
        (`engine.dag.parse_run`, problems under ``run.``)."""
        if not isinstance(template, Run):
            raise TypeError(f"step {name!r}: a child run's template is a Run, not {template!r}")
        step = self.step(
            name,
            "$run",
            input=input,
            depends_on=depends_on,
            run_if=run_if,
            max_attempts=max_attempts,
            idempotent=idempotent,
            **fields,
        )
        del step.spec["tool"]
        step.spec["run"] = template.to_dict()
        return step

    def _own_step(self, dep: Step | str, name: str, field: str) -> str:
        """The name of `dep`, a step of this run added before `name`."""
        if isinstance(dep, Step):
            if dep.run is not self:
                raise _problem(name, field, f"step {dep.name!r} belongs to another Run")
            return dep.name
        if isinstance(dep, str):
            if dep not in self.steps:
                raise _problem(
                    name,
                    field,
                    f"no step {dep!r} in this run yet (add a step's dependencies before it)",
                )
            return dep
        raise TypeError(f"step {name!r}: {field} takes Step objects or step names, not {dep!r}")

    def to_dict(self) -> dict[str, Any]:
        """The ``POST /runs`` body: ``{"goal", ["idempotencyKey", "priority", "startAt"],
        "steps": [...]}``, each step with only the fields that were set. A fresh copy."""
        body = json.loads(json.dumps(self._head))
        body["steps"] = [json.loads(json.dumps(s.spec)) for s in self.steps.values()]
        return body  # type: ignore[no-any-return]

    def to_json(self, *, indent: int | None = None) -> str:
        """`to_dict` as JSON text."""
        return json.dumps(self.to_dict(), indent=indent)

    def __repr__(self) -> str:
        return f"Run({self._head.get('goal', '')!r}, {len(self.steps)} steps)"


__all__ = ["Param", "Ref", "Run", "Step", "index", "item", "param"]
