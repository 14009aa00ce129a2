"""The DAG model: the shape of a submitted run and every check made before anything is written.

`parse_run(body, max_steps=...)` turns a decoded ``POST /runs`` body into a `RunSpec` or
raises `ValidationFailed` with every problem found, each naming the step (when there is one),
the field and the problem. Checks: field types and ranges, step names, duplicate names,
unknown dependencies, self-dependencies, cycles, unknown tools, inputs the tool's schema
refuses, the step-count limit, references (``{"$ref": ...}``: syntax, and the step named must
be an ancestor), map sources, trigger rules and concurrency keys.

A reference is an object ``{"$ref": "<path>"}`` anywhere in a step's input (or as a step's
``map``). Paths are dot-separated; a segment that is an integer indexes an array (negative
counts from the end). Roots:

- ``steps.<name>.output[.<path>]``: the output of `name`, which must be an ancestor of the
  step (reachable through ``dependsOn``); ``steps.<name>.status`` and ``steps.<name>.error``
  give its final status and error (useful after ``"runIf": "all_done"``).
- ``item[.<path>]`` and ``index``: inside a map step's input, the child's element and its
  position.

A step of kind ``run`` has ``"run": {template}`` instead of a ``tool``: the template is a run
body (goal, steps...) validated here like a submitted run, its problems named under
``run.``; its steps' inputs may hold ``{"$param": "<key>"}`` placeholders, each naming a key
of the run step's own ``input`` (whose ``$ref``s are resolved like any step's), substituted
when the child run is created (`child_run_spec`). A template cannot hold a run step itself:
nesting depth is 1.

A key that contains a dot cannot be reached (the path syntax has no escape).
"""

from __future__ import annotations

import hashlib
import json
from collections import deque
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from dataclasses import field as dataclass_field
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

import orjson
from pydantic import (
    AfterValidator,
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
)

from engine.config import MAX_ATTEMPTS_DEFAULT
from engine.errors import UnknownTool, ValidationFailed
from engine.tools import get_tool

STEP_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}$"
MAX_TIMEOUT_MS = 24 * 3600 * 1000
# The longest sleep a step may ask for (``delayMs``): 30 days, in milliseconds. A longer wait
# is a schedule's job (issue 15, part 3), not a parked step's.
MAX_DELAY_MS = 30 * 24 * 3600 * 1000
# The longest a wait step may wait for its signal (``wait.timeoutS``): 30 days, in seconds,
# the bound of delayMs (a wait step parks as a sleep of its timeout).
MAX_WAIT_TIMEOUT_S = MAX_DELAY_MS // 1000
# A signal's name: a URL path segment (POST /runs/{runId}/signals/{signal}), as a step name.
SIGNAL_NAME_PATTERN = STEP_NAME_PATTERN
MAX_ATTEMPTS_LIMIT = 100
PRIORITY_LIMIT = 1_000_000
MAX_CONCURRENCY_LIMIT = 100_000
REF_FIELDS = ("output", "status", "error")
# The tool of a step of kind run (``"run": {template}``): "$" starts no tool a worker or an
# agent can load (engine.tools.tool and the agents' tool names refuse it), so only the
# maintenance leader takes such a step (engine/maintenance/child_runs.py).
CHILD_RUN_TOOL = "$run"
# The tool of a wait step (``"wait": {...}``, migration 0010): likewise no worker or agent
# can load it, and it is never ready (the maintenance leader times it out instead).
WAIT_TOOL = "$wait"
RESERVED_TOOL_PREFIX = "$"
# A child run's idempotency key starts with this (engine.transitions.start_child_runs); a
# client's key may not, so no submitted run can take a child's key.
CHILD_RUN_KEY_PREFIX = "pgdag-child:"

# Every point in time the API accepts lies in [TIMESTAMP_MIN, TIMESTAMP_MAX] once converted to
# UTC. Python's datetime holds years 1..9999 and Postgres' timestamptz 4713 BC..294276 AD, but
# psycopg loads a timestamptz into a datetime in the session's time zone: a value outside
# years 1..9999 there cannot be read back, and every read that includes it fails. The upper
# bound keeps a day in hand for any session time zone (Postgres allows offsets up to 15:59);
# the lower is the Unix epoch: nothing a workflow engine schedules or filters on is earlier.
TIMESTAMP_MIN = datetime(1970, 1, 1, tzinfo=UTC)
TIMESTAMP_MAX = datetime(9999, 12, 30, 23, 59, 59, 999999, tzinfo=UTC)
TIMESTAMP_RANGE = "1970-01-01T00:00:00Z .. 9999-12-30T23:59:59.999999Z"


def bounded_utc(value: datetime) -> datetime:
    """`value` (timezone-aware) converted to UTC, if it lies between `TIMESTAMP_MIN` and
    `TIMESTAMP_MAX` there; raises `ValueError` saying the range otherwise (pydantic turns it
    into a field error)."""
    try:
        utc = value.astimezone(UTC)
    except OverflowError:  # year 0 or 10000 once the offset is applied
        utc = None
    if utc is None or not TIMESTAMP_MIN <= utc <= TIMESTAMP_MAX:
        raise ValueError(f"must lie in {TIMESTAMP_RANGE} once converted to UTC")
    return utc


# A timestamp as the API takes it: ISO 8601 with an offset, bounded, converted to UTC.
ApiDatetime = Annotated[AwareDatetime, AfterValidator(bounded_utc)]

NUL_PROBLEM = "contains NUL (\\u0000), which PostgreSQL text and jsonb cannot store"
SURROGATE_PROBLEM = (
    "contains a lone UTF-16 surrogate (\\ud800-\\udfff), which is not Unicode text; "
    "PostgreSQL text and jsonb cannot store it"
)


def _text_problem(text: str) -> str | None:
    if "\x00" in text:
        return NUL_PROBLEM
    try:
        text.encode("utf-8")  # json.loads pairs surrogates; one left alone cannot encode
    except UnicodeEncodeError:
        return SURROGATE_PROBLEM
    return None


def _safe_segment(key: str) -> str:
    """`key` as a field-path segment that can always be sent back (escapes made visible)."""
    return key if _text_problem(key) is None else key.encode("unicode_escape").decode("ascii")


def unstorable_text(value: Any) -> list[tuple[list[str | int], str]]:
    """Every string in `value` (a decoded JSON document: keys included) that PostgreSQL
    cannot store, as ``(path, problem)``: NUL, which neither ``text`` nor ``jsonb`` accepts
    (PostgreSQL docs, 8.3 Character Types and 8.14 JSON Types), and a lone UTF-16 surrogate
    (``"\\ud800"`` in JSON), which is not valid Unicode. For a bad key the path is that of
    the object holding it and the problem says "a key". Iterative: any nesting depth."""
    if _all_text_storable(value):
        return []
    found: list[tuple[list[str | int], str]] = []
    todo: list[tuple[list[str | int], Any]] = [([], value)]
    while todo:
        at, item = todo.pop()
        if isinstance(item, str):
            problem = _text_problem(item)
            if problem is not None:
                found.append((at, problem))
        elif isinstance(item, dict):
            for key, child in item.items():
                problem = _text_problem(key)
                if problem is not None:
                    found.append((at, f"a key {problem}"))
                    continue
                todo.append(([*at, key], child))
        elif isinstance(item, list):
            todo.extend(([*at, i], child) for i, child in enumerate(item))
    found.sort(key=lambda f: [str(p) for p in f[0]])
    return found


def _all_text_storable(value: Any) -> bool:
    """True only when no string of `value` (keys included) holds NUL or a lone surrogate,
    decided in one pass of orjson's C encoder: 6 ms for a 10,000-step run, where the walk
    of `unstorable_text` takes 30 to 40 ms and allocates a path per value. orjson refuses a
    lone surrogate (TypeError) and writes NUL as ``\\u0000``. Any refusal (also an int past
    64 bits, a key that is not a string, nesting past 255) or ``\\u0000`` in the text (NUL,
    or a string holding a backslash and ``u0000``) answers False: the walk then decides,
    exactly as before."""
    try:
        text = orjson.dumps(value)
    except TypeError:  # orjson.JSONEncodeError is a TypeError
        return False
    return b"\\u0000" not in text


def text_problems(body: Any, *, runs: bool = True) -> list[Problem]:
    """`unstorable_text` of a request body as problems naming the field; with `runs`, paths
    under ``steps.<i>`` name the step (its name, or ``#i`` when the name itself is bad) and
    the field inside it."""
    problems: list[Problem] = []
    for at, problem in unstorable_text(body):
        step: str | None = None
        rest = at
        if runs and len(at) >= 2 and at[0] == "steps" and isinstance(at[1], int):
            name = _step_name_at(body, at[1])
            step = name if _text_problem(name) is None else f"#{at[1]}"
            rest = at[2:]
        field = ".".join(_safe_segment(p) if isinstance(p, str) else str(p) for p in rest)
        problems.append(
            {"step": step, "field": field or ("step" if step else "body"), "problem": problem}
        )
    return problems


RunIf = Literal["all_succeeded", "all_done", "any_failed"]

Problem = dict[str, str | None]


@dataclass
class StepRefs:
    """A step's references as `parse_run` parsed them: `refs` are
    ``[{"at": [...], "path": [...], "ref": "...", "field": "input...."}]``; `map_path` is a map
    step's source path, split (None for other steps)."""

    refs: list[dict[str, Any]] = dataclass_field(default_factory=list)
    map_path: list[str] | None = None


class WaitSpec(BaseModel):
    """A wait step's wait (``"wait": {"signal", "timeoutS", "approval"}``): the step succeeds
    with the payload of the signal `signal` sent to its run (``POST
    /runs/{runId}/signals/{signal}``), and its attempt fails when `timeout_s` seconds pass
    first (counted from when its dependencies are done; a root: from its run's start). An
    `approval` is shown with Approve / Reject buttons; a signal whose payload says
    ``"approved": false`` dead-letters it at once (a person decided)."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    signal: str = Field(pattern=SIGNAL_NAME_PATTERN)
    timeout_s: int = Field(ge=1, le=MAX_WAIT_TIMEOUT_S, alias="timeoutS", strict=True)
    approval: bool = Field(default=False, strict=True)


# Fields a wait step may not have: it runs no tool, so it has no input, map, timeout,
# concurrency key or delay (its wait is its delay).
_NOT_WITH_WAIT: tuple[tuple[str, str], ...] = (
    ("tool", "tool"),
    ("run", "run"),
    ("input", "input"),
    ("map", "map"),
    ("timeout_ms", "timeoutMs"),
    ("concurrency_key", "concurrencyKey"),
    ("max_concurrency", "maxConcurrency"),
    ("delay_ms", "delayMs"),
)


class StepSpec(BaseModel):
    """One step of a submitted run (camelCase on the wire): a tool call (`tool`, `input`),
    or a wait for a signal (`wait`, no tool)."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    name: str = Field(pattern=STEP_NAME_PATTERN)
    # A tool; or (a step of kind run) a child-run template in `run`; or (a wait step) the
    # signal it waits for in `wait`: exactly one of the three.
    tool: str | None = Field(default=None, min_length=1, max_length=128)
    run: dict[str, Any] | None = None
    wait: WaitSpec | None = None
    input: dict[str, Any] = Field(default_factory=dict)
    depends_on: list[str] = Field(default_factory=list, alias="dependsOn", max_length=1000)
    max_attempts: int = Field(
        default=MAX_ATTEMPTS_DEFAULT, ge=1, le=MAX_ATTEMPTS_LIMIT, alias="maxAttempts"
    )
    timeout_ms: int | None = Field(default=None, ge=1, le=MAX_TIMEOUT_MS, alias="timeoutMs")
    idempotent: bool = True
    run_if: RunIf = Field(default="all_succeeded", alias="runIf")
    map: dict[str, Any] | None = None
    concurrency_key: str | None = Field(
        default=None, min_length=1, max_length=200, alias="concurrencyKey"
    )
    max_concurrency: int | None = Field(
        default=None, ge=1, le=MAX_CONCURRENCY_LIMIT, alias="maxConcurrency"
    )
    # Milliseconds to sleep, parked in Postgres (no lease, no worker slot), between the
    # moment the step's dependencies are done (a root: its run's start) and its becoming
    # ready. A map step sleeps once, before it expands; its children and its join do not.
    # Strict: a JSON integer only (true, "5" or 1.0 are refused, not read as a number).
    delay_ms: int | None = Field(default=None, ge=0, le=MAX_DELAY_MS, alias="delayMs", strict=True)

    def to_row(self, parsed: StepRefs | None = None) -> dict[str, Any]:
        """The JSON object `insert_steps` reads for this step, with its references as
        `parse_run` parsed them (`RunSpec.rows` passes them)."""
        row: dict[str, Any] = {
            "name": self.name,
            "tool": CHILD_RUN_TOOL
            if self.run is not None
            else WAIT_TOOL
            if self.wait is not None
            else self.tool,
            "input": self.input,
            "dependsOn": self.depends_on,
            "maxAttempts": self.max_attempts,
            "idempotent": self.idempotent,
        }
        # The rest only when set: insert_steps reads a missing key as NULL (its default), and
        # a 10,000-step run's JSON stays half the size. (Plain ifs: this runs once per step.)
        if self.timeout_ms is not None:
            row["timeoutMs"] = self.timeout_ms
        if self.run_if != "all_succeeded":
            row["runIf"] = self.run_if
        refs = parsed.refs if parsed is not None else []
        map_path = parsed.map_path if parsed is not None else None
        if refs or map_path is not None:
            ref_steps = {r["path"][1] for r in refs if r["path"][0] == "steps"}
            if map_path is not None:
                ref_steps.add(map_path[1])
            if refs:
                row["refs"] = refs
            if ref_steps:
                row["refSteps"] = sorted(ref_steps)
        if self.map is not None and self.map["$ref"] is not None:
            row["map"] = self.map["$ref"]
        if map_path is not None:
            row["mapPath"] = map_path
        if self.concurrency_key is not None:
            row["concurrencyKey"] = self.concurrency_key
        if self.max_concurrency is not None:
            row["maxConcurrency"] = self.max_concurrency
        if self.delay_ms:  # 0 sleeps no time: stored as no delay
            row["delayMs"] = self.delay_ms
        if self.run is not None:
            row["run"] = self.run
        if self.wait is not None:  # parks as a sleep of its timeout (migration 0010)
            row["delayMs"] = self.wait.timeout_s * 1000
            row["waitSignal"] = self.wait.signal
            row["waitApproval"] = self.wait.approval
        return row


class RunSpec(BaseModel):
    """A submitted run: a goal, an optional client idempotency key, and its steps."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    goal: str = Field(default="", max_length=2000)
    idempotency_key: str | None = Field(
        default=None, min_length=1, max_length=255, alias="idempotencyKey"
    )
    steps: list[StepSpec] = Field(min_length=1)
    priority: int = Field(default=0, ge=-PRIORITY_LIMIT, le=PRIORITY_LIMIT)
    start_at: ApiDatetime | None = Field(default=None, alias="startAt")

    # Filled by parse_run (private: a client cannot set it): step name -> its references.
    _parsed: dict[str, StepRefs] | None = PrivateAttr(default=None)

    def refs_of(self, name: str) -> StepRefs:
        """The references `parse_run` found in step `name` (none for a step it did not see)."""
        return (self._parsed or {}).get(name) or StepRefs()

    def rows(self) -> list[dict[str, Any]]:
        """Every step as `StepSpec.to_row` shapes it, with its references, and
        ``maySkipChildren`` on the steps an ``any_failed`` dependent waits for."""
        awaited = {d for s in self.steps if s.run_if == "any_failed" for d in s.depends_on}
        # Read once: a private attribute costs pydantic's __getattr__ on every access.
        parsed = self._parsed or {}
        rows = []
        for s in self.steps:
            row = s.to_row(parsed.get(s.name))
            if s.name in awaited:
                row["maySkipChildren"] = True
            rows.append(row)
        return rows

    def fingerprint(self) -> str:
        """The sha256 (hex) of this run's canonical JSON: the parsed body with every default
        filled in, ``startAt`` in UTC, keys sorted, no whitespace, the idempotency key left
        out. Two bodies that submit the same run have the same fingerprint, however they are
        spelled; ``runs.idempotency_fingerprint`` keeps it (migration 0005)."""
        doc = self.model_dump(mode="json", by_alias=True, exclude={"idempotency_key"})
        for step in doc["steps"]:
            # No delay (left out, null or 0) is left out: a run whose key was fingerprinted
            # before delayMs existed (migration 0009) keeps its fingerprint.
            if not step.get("delayMs"):
                step.pop("delayMs", None)
            if step.get("run") is None:  # likewise for the child-run template (0011)
                step.pop("run", None)
            if step.get("wait") is None:  # likewise for wait steps (0010)
                step.pop("wait", None)
        text = json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
        return hashlib.sha256(text.encode()).hexdigest()

    def steps_json(self) -> str:
        """All steps as the JSON array `insert_steps` takes."""
        return json.dumps(self.rows(), separators=(",", ":"))


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


def parse_run(
    body: Any,
    *,
    max_steps: int,
    remote_tools: Collection[str] = frozenset(),
    known: Mapping[str, ExistingStep] | None = None,
    child_params: Collection[str] | None = None,
) -> RunSpec:
    """Validate a decoded ``POST /runs`` body and return the `RunSpec`.

    `known` are steps the run has already (`parse_added_steps`): ``dependsOn`` and
    ``$ref`` may name them too, and they count as ancestors through their own dependsOn.

    `remote_tools` are tools this process has not loaded but a live worker or agent has
    (`Store.live_worker_tools`): a step of one is accepted, and its input is not checked
    here (no schema to check it with; its worker checks it when it runs the step).

    `child_params` (not None) says `body` is a child-run template (a run step's ``run``):
    its steps' inputs may hold ``{"$param": name}`` with a name in `child_params` (a place
    the tool's schema is not checked at: its value comes when the child is created), it may
    not hold run steps (nesting depth 1) nor an ``idempotencyKey`` (pgdag sets the child's).

    Raises `ValidationFailed` listing every problem found (``step``, ``field``, ``problem``).
    """
    if not isinstance(body, dict):
        raise ValidationFailed(
            [{"step": None, "field": "body", "problem": "must be a JSON object"}]
        )
    bad_text = text_problems(body)
    if bad_text:  # before anything else, so no problem text echoes what cannot be sent back
        raise ValidationFailed(bad_text)
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
    known = known or {}
    for step in spec.steps:
        if step.name in names:
            problems.append({"step": step.name, "field": "name", "problem": "duplicate step name"})
        elif step.name in known:
            problems.append(
                {
                    "step": step.name,
                    "field": "name",
                    "problem": "a step of this run already has this name",
                }
            )
        names.add(step.name)
    key_limits: dict[str, tuple[int, str]] = {}
    refs_by_step: dict[str, StepRefs] = {}
    names_new = names
    if known:
        names = names | set(known)
    signals: dict[str, str] = {}  # signal name -> the wait step that waits for it
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
        problems.extend(_concurrency_problems(step, key_limits))
        if step.wait is not None:
            problems.extend(_wait_problems(step, signals))
            continue
        step_problems: list[Problem] = []
        parsed = _collect_step_refs(step, names, step_problems)
        refs_by_step[step.name] = parsed
        problems.extend(step_problems)
        if step.run is not None or step.tool is None:
            problems.extend(
                _child_run_problems(step, max_steps, remote_tools, nested=child_params is not None)
            )
            continue
        param_places: list[tuple[str, ...]] = []
        if child_params is not None:
            param_places = _param_places(step, child_params, problems)
        if step.tool.startswith(RESERVED_TOOL_PREFIX):
            problems.append(
                {
                    "step": step.name,
                    "field": "tool",
                    "problem": f"tool names starting with {RESERVED_TOOL_PREFIX!r} are pgdag's",
                }
            )
            continue
        try:
            tool = get_tool(step.tool)
        except UnknownTool as exc:
            if step.tool not in remote_tools:
                problems.append(
                    {
                        "step": step.name,
                        "field": "tool",
                        "problem": f"{exc}; and no live worker or agent has it",
                    }
                )
            continue
        if step_problems:
            continue
        ref_places = [tuple(r["at"]) for r in parsed.refs] + param_places
        try:
            tool.parse_input(step.input)
        except ValidationError as exc:
            for err in exc.errors(include_url=False):
                loc = tuple(str(part) for part in err["loc"])
                if err["type"] != "extra_forbidden" and any(
                    loc[: len(at)] == at for at in ref_places
                ):
                    continue  # a reference (or a $param): its value is checked later
                sub = _field_path(tuple(err["loc"]))
                problems.append(
                    {
                        "step": step.name,
                        "field": f"input.{sub}" if sub else "input",
                        "problem": f"{step.tool}: {err['msg']}",
                    }
                )
    # The graph checks need every name unique and every dependency known; the other
    # problems (a tool, an input) do not stop them, so a refusal names everything at once.
    if not any(p["field"] in ("name", "dependsOn") for p in problems):
        graph = spec.steps
        if known:  # known steps never depend on new ones: a cycle lies among the new
            graph = [
                s.model_copy(update={"depends_on": [d for d in s.depends_on if d in names_new]})
                for s in spec.steps
            ]
        cycle = _find_cycle(graph)
        if cycle is not None:
            problems.append(
                {
                    "step": cycle[0],
                    "field": "dependsOn",
                    "problem": "dependency cycle: " + " -> ".join(cycle),
                }
            )
        elif known:
            stubs = [
                StepSpec.model_construct(
                    name=k.name, depends_on=[d for d in k.depends_on if d in known]
                )
                for k in known.values()
            ]
            problems.extend(_ancestor_problems([*stubs, *spec.steps], refs_by_step))
        else:
            problems.extend(_ancestor_problems(spec.steps, refs_by_step))
    if (
        child_params is None
        and spec.idempotency_key is not None
        and spec.idempotency_key.startswith(CHILD_RUN_KEY_PREFIX)
    ):
        problems.append(
            {
                "step": None,
                "field": "idempotencyKey",
                "problem": f"keys starting with {CHILD_RUN_KEY_PREFIX!r} are pgdag's (child runs)",
            }
        )
    if child_params is not None and spec.idempotency_key is not None:
        problems.append(
            {
                "step": None,
                "field": "idempotencyKey",
                "problem": "a child run's idempotency key is pgdag's "
                "(pgdag-child:<parentRunId>:<stepName>:<attempt>)",
            }
        )
    if problems:
        raise ValidationFailed(problems)
    spec._parsed = refs_by_step
    return spec


def _wait_problems(step: StepSpec, signals: dict[str, str]) -> list[Problem]:
    """A wait step has no tool, input, map, timeoutMs, concurrency key or delayMs, and no two
    wait steps of a run wait for one signal (a signal completes one step). `signals` maps the
    signals seen so far to their step; this step's is added."""
    assert step.wait is not None
    problems: list[Problem] = [
        {
            "step": step.name,
            "field": alias,
            "problem": "a wait step runs no tool: it takes no " + alias,
        }
        for attr, alias in _NOT_WITH_WAIT
        if attr in step.model_fields_set
    ]
    other = signals.setdefault(step.wait.signal, step.name)
    if other != step.name:
        problems.append(
            {
                "step": step.name,
                "field": "wait.signal",
                "problem": f"step {other!r} already waits for signal {step.wait.signal!r}; "
                "one signal completes one step",
            }
        )
    return problems


def _child_run_problems(
    step: StepSpec, max_steps: int, remote_tools: Collection[str], *, nested: bool
) -> list[Problem]:
    """What is wrong with a step of kind run (`step.run` set, or neither tool nor run): its
    template's problems are named under ``run.`` (``run.steps.<name>.<field>``)."""
    if step.tool is None and step.run is None:
        return [
            {
                "step": step.name,
                "field": "tool",
                "problem": 'a step needs a tool, a "run" (a child-run template) or a "wait"',
            }
        ]
    if step.tool is not None:
        return [
            {"step": step.name, "field": "run", "problem": 'a step has a tool or a "run", not both'}
        ]
    if nested:
        return [
            {
                "step": step.name,
                "field": "run",
                "problem": "a child run cannot start child runs (nesting depth is 1)",
            }
        ]
    # What a worker enforces, or the claim's slots, means nothing to the maintenance leader
    # that starts a child: refused rather than ignored.
    unsupported = {
        "map": step.map,
        "timeoutMs": step.timeout_ms,
        "concurrencyKey": step.concurrency_key,
        "maxConcurrency": step.max_concurrency,
    }
    refused: list[Problem] = [
        {"step": step.name, "field": field, "problem": "a run step cannot have one"}
        for field, value in unsupported.items()
        if value is not None
    ]
    if refused:
        return refused
    try:
        parse_run(
            step.run, max_steps=max_steps, remote_tools=remote_tools, child_params=set(step.input)
        )
    except ValidationFailed as exc:
        out: list[Problem] = []
        for p in exc.problems:
            inner = f"steps.{p['step']}.{p['field']}" if p.get("step") else str(p["field"])
            out.append({"step": step.name, "field": f"run.{inner}", "problem": str(p["problem"])})
        return out
    return []


def _find_params(value: Any, at: list[str], found: list[tuple[list[str], dict[str, Any]]]) -> None:
    """Every ``{"$param": ...}`` object inside `value`, with the path of keys/indices to it."""
    if isinstance(value, dict):
        if "$param" in value:
            found.append((at, value))
            return
        for key, item in value.items():
            _find_params(item, [*at, str(key)], found)
    elif isinstance(value, list):
        for index, item in enumerate(value):
            _find_params(item, [*at, str(index)], found)


def _param_places(
    step: StepSpec, params: Collection[str], problems: list[Problem]
) -> list[tuple[str, ...]]:
    """The places of a template step's ``$param`` placeholders; bad ones go to `problems`."""
    found: list[tuple[list[str], dict[str, Any]]] = []
    _find_params(step.input, [], found)
    places: list[tuple[str, ...]] = []
    for at, obj in found:
        field = ".".join(["input", *at])
        name = obj.get("$param")
        if len(obj) != 1 or not isinstance(name, str):
            problems.append(
                _ref_problem(step, field, 'must be {"$param": "<a key of the run step\'s input>"}')
            )
        elif name not in params:
            places.append(tuple(at))  # (its schema check would only repeat the problem)
            known = ", ".join(sorted(params)) or "none"
            problems.append(
                _ref_problem(
                    step,
                    field,
                    f"$param {name!r} is no key of the run step's input (keys: {known})",
                )
            )
        else:
            places.append(tuple(at))
    return places


def substitute_params(value: Any, params: dict[str, Any]) -> Any:
    """`value` with every ``{"$param": name}`` replaced by ``params[name]`` (a copy; a name
    missing from `params` becomes null)."""
    if isinstance(value, dict):
        if len(value) == 1 and isinstance(value.get("$param"), str):
            return params.get(value["$param"])
        return {k: substitute_params(v, params) for k, v in value.items()}
    if isinstance(value, list):
        return [substitute_params(v, params) for v in value]
    return value


def child_run_spec(
    template: dict[str, Any],
    params: dict[str, Any],
    *,
    idempotency_key: str,
    goal: str,
    max_steps: int,
    remote_tools: Collection[str] = frozenset(),
) -> RunSpec:
    """The child run a run step starts: `template` (its ``run``) with each step's ``$param``
    placeholders replaced by `params` (the step's resolved input), validated like a submitted
    run, with `idempotency_key` (``pgdag-child:<parentRunId>:<stepName>:<attempt>``) and
    `goal` when the template has none.

    Raises `ValidationFailed` when the substituted template is refused (a value of the wrong
    type for its tool, say): the run step fails with those problems as its error."""
    body = dict(template)
    steps = body.get("steps")
    if isinstance(steps, list):
        body["steps"] = [
            {**s, "input": substitute_params(s["input"], params)}
            if isinstance(s, dict) and "input" in s
            else s
            for s in steps
        ]
    body.setdefault("goal", goal[:2000])
    spec = parse_run(
        body, max_steps=max_steps, remote_tools=remote_tools, child_params=params.keys()
    )
    spec.idempotency_key = idempotency_key
    return spec


def _concurrency_problems(step: StepSpec, key_limits: dict[str, tuple[int, str]]) -> list[Problem]:
    """concurrencyKey and maxConcurrency come together, and one key has one limit per run."""
    if step.concurrency_key is None and step.max_concurrency is None:
        return []
    if step.concurrency_key is None:
        return [
            {
                "step": step.name,
                "field": "maxConcurrency",
                "problem": "needs a concurrencyKey (the key it limits)",
            }
        ]
    if step.max_concurrency is None:
        return [
            {
                "step": step.name,
                "field": "concurrencyKey",
                "problem": "needs a maxConcurrency (how many steps of the key may run at once)",
            }
        ]
    seen = key_limits.setdefault(step.concurrency_key, (step.max_concurrency, step.name))
    if seen[0] != step.max_concurrency:
        return [
            {
                "step": step.name,
                "field": "maxConcurrency",
                "problem": f"concurrencyKey {step.concurrency_key!r} has maxConcurrency "
                f"{seen[0]} in step {seen[1]!r}; one key has one limit",
            }
        ]
    return []


def parse_ref(ref: str, names: set[str]) -> list[str]:
    """Split a reference path into segments, the step name kept whole (names may contain
    dots: the longest name that fits wins). Raises `ValueError` saying what is wrong."""
    if ref == "index":
        return ["index"]
    if ref == "item":
        return ["item"]
    if ref.startswith("item."):
        return ["item", *_segments(ref[len("item.") :], ref)]
    if not ref.startswith("steps."):
        raise ValueError(f"$ref {ref!r} must start with steps.<name>.output, item or index")
    rest = ref[len("steps.") :]
    parts = rest.split(".")
    # The longest prefix of the segments that names a step and is followed by a field.
    for cut in range(len(parts) - 1, 0, -1):
        name = ".".join(parts[:cut])
        if name not in names or parts[cut] not in REF_FIELDS:
            continue
        tail = _segments(".".join(parts[cut:]), ref)
        if tail[0] != "output" and len(tail) > 1:
            raise ValueError(f"$ref {ref!r}: steps.{name}.{tail[0]} has no fields")
        return ["steps", name, *tail]
    raise ValueError(
        f"$ref {ref!r} names no step of this run (the form is steps.<name>.output[.path], "
        "or .status or .error)"
    )


def _segments(text: str, ref: str) -> list[str]:
    parts = text.split(".")
    if any(part == "" for part in parts):
        raise ValueError(f"$ref {ref!r} has an empty path segment")
    return parts


def _find_refs(value: Any, at: list[str], found: list[tuple[list[str], Any]]) -> None:
    """Every ``{"$ref": ...}`` object inside `value`, with the path of keys/indices to it."""
    if isinstance(value, dict):
        if "$ref" in value:
            found.append((at, value))
            return
        for key, item in value.items():
            _find_refs(item, [*at, str(key)], found)
    elif isinstance(value, list):
        for index, item in enumerate(value):
            _find_refs(item, [*at, str(index)], found)


def _ref_problem(step: StepSpec, field: str, problem: str) -> Problem:
    return {"step": step.name, "field": field, "problem": problem}


def _collect_step_refs(step: StepSpec, names: set[str], problems: list[Problem]) -> StepRefs:
    """Parse the step's references; append what is wrong with them to `problems`."""
    parsed = StepRefs()
    found: list[tuple[list[str], Any]] = []
    _find_refs(step.input, [], found)
    refs: list[dict[str, Any]] = []
    for at, obj in found:
        field = ".".join(["input", *at])
        ref = obj.get("$ref")
        if len(obj) != 1:
            problems.append(_ref_problem(step, field, 'a {"$ref": ...} object has no other keys'))
            continue
        if not isinstance(ref, str):
            problems.append(_ref_problem(step, field, "$ref must be a string"))
            continue
        try:
            path = parse_ref(ref, names)
        except ValueError as exc:
            problems.append(_ref_problem(step, field, str(exc)))
            continue
        if path[0] in ("item", "index") and step.map is None:
            problems.append(
                _ref_problem(step, field, f"$ref {ref!r}: item and index exist only in a map step")
            )
            continue
        refs.append({"at": at, "path": path, "ref": ref, "field": field})
    parsed.refs = refs
    if step.map is not None:
        ref = step.map.get("$ref")
        if len(step.map) != 1 or not isinstance(ref, str):
            problems.append(
                _ref_problem(step, "map", 'must be {"$ref": "steps.<name>.output[.path]"}')
            )
        else:
            try:
                path = parse_ref(ref, names)
            except ValueError as exc:
                problems.append(_ref_problem(step, "map", str(exc)))
            else:
                if path[0] != "steps":
                    problems.append(
                        _ref_problem(step, "map", f"$ref {ref!r} must name a step's output")
                    )
                else:
                    parsed.map_path = path
    return parsed


def _ancestor_problems(steps: list[StepSpec], parsed: dict[str, StepRefs]) -> list[Problem]:
    """A reference may name only an ancestor: a step reachable through ``dependsOn``, which
    is sure to have ended before this step starts."""
    if not any(p.refs or p.map_path for p in parsed.values()):
        return []
    # Ancestor sets as bitsets (Python ints, bit i = step i), built in topological order:
    # linear in steps x dependencies x (steps / 64), where sets of names were quadratic.
    index = {s.name: i for i, s in enumerate(steps)}
    by_name = {s.name: s for s in steps}
    children: dict[str, list[str]] = {s.name: [] for s in steps}
    indegree = {s.name: len(s.depends_on) for s in steps}
    for s in steps:
        for dep in s.depends_on:
            children[dep].append(s.name)
    bits: dict[str, int] = {}
    queue = deque(name for name, n in indegree.items() if n == 0)
    while queue:
        name = queue.popleft()
        acc = 0
        for dep in by_name[name].depends_on:
            acc |= bits[dep] | (1 << index[dep])
        bits[name] = acc
        for child in children[name]:
            indegree[child] -= 1
            if indegree[child] == 0:
                queue.append(child)

    def is_ancestor(candidate: str, of: str) -> bool:
        return bool(bits[of] >> index[candidate] & 1)

    problems: list[Problem] = []
    for step in steps:
        mine = parsed.get(step.name) or StepRefs()
        named = [(r["field"], r["ref"], r["path"]) for r in mine.refs if r["path"][0] == "steps"]
        if step.map is not None and mine.map_path is not None:
            named.append(("map", step.map["$ref"], mine.map_path))
        if not named:
            continue
        for field, ref, path in named:
            if not is_ancestor(path[1], step.name):
                problems.append(
                    _ref_problem(
                        step,
                        field,
                        f"$ref {ref!r}: step {path[1]!r} is not an ancestor of {step.name!r} "
                        "(add it, or a step that depends on it, to dependsOn)",
                    )
                )
    return problems


# --- steps a run adds to itself (issue 15 part 5) ----------------------------------------

# The statuses of an existing step an added step may depend on: one that succeeded (its
# output is there to reference; it counts as done at once). The step adding them may be
# named too (its own success, in the same transaction, counts it down). A step still
# pending, ready or running is refused: its success may be in flight under a snapshot taken
# before the new edges exist (complete_steps reads step_edges once, at its start), and it
# would never count the new step down; a dead letter, skipped or cancelled step has nothing
# to hand on.
ADDABLE_DEP_STATUSES = frozenset({"succeeded"})


@dataclass(frozen=True)
class ExistingStep:
    """A step of the run as `parse_added_steps` sees it: its name, status and dependsOn."""

    name: str
    status: str
    depends_on: list[str]


def parse_added_steps(
    raw_steps: Any,
    *,
    adder: str,
    existing: Collection[ExistingStep],
    max_steps: int,
    remote_tools: Collection[str] = frozenset(),
    in_child_run: bool = False,
) -> RunSpec:
    """Validate the steps that the running step `adder` adds to its run, as ``POST /runs``
    validates a run's steps (`parse_run`: fields, names, tools, tool inputs, references,
    trigger rules, concurrency keys), against the steps the run already has (`existing`,
    the adder among them): a new name must not be taken; ``dependsOn`` may name new steps,
    the adder, and existing steps that succeeded (`ADDABLE_DEP_STATUSES`); a ``$ref`` may
    name only an ancestor through those; the run may hold at most `max_steps` steps in all;
    a run that is itself a child run (`in_child_run`) may not add steps of kind run (nesting
    depth is 1, as in a child-run template).

    Returns a `RunSpec` whose `RunSpec.rows` are the new steps for ``insert_added_steps``.
    Raises `ValidationFailed` with every problem found, each naming the step (``#<i>`` when
    it has no usable name) and the field inside it, as a 422 body does; a problem of the
    list itself (not a list, empty, the step limit) names the field ``addSteps``.
    """
    if not isinstance(raw_steps, list) or not raw_steps:
        raise ValidationFailed(
            [{"step": None, "field": "addSteps", "problem": "must be a non-empty list of steps"}],
            subject="added steps",
        )
    total = len(existing) + len(raw_steps)
    if total > max_steps:
        raise ValidationFailed(
            [
                {
                    "step": None,
                    "field": "addSteps",
                    "problem": f"too many steps: the run would hold {total} > the limit of "
                    f"{max_steps} (PGDAG_MAX_STEPS)",
                }
            ],
            subject="added steps",
        )
    by_name = {s.name: s for s in existing}
    try:
        spec = parse_run(
            {"steps": raw_steps},
            max_steps=max(max_steps, len(raw_steps)),
            remote_tools=remote_tools,
            known=by_name,
        )
    except ValidationFailed as exc:
        raise ValidationFailed(_added_fields(exc.problems), subject="added steps") from None
    problems: list[Problem] = []
    for step in spec.steps:
        if step.wait is not None:
            # insert_added_steps stores no wait columns, and one signal name may have only
            # one waiting step per run, which `existing` cannot check: a wait step comes with
            # its run (POST /runs) or not at all.
            problems.append(
                {
                    "step": step.name,
                    "field": "wait",
                    "problem": "a wait step cannot be added by a step: submit it with the run",
                }
            )
        if in_child_run and step.run is not None:
            problems.append(
                {
                    "step": step.name,
                    "field": "run",
                    "problem": "this run is a child run, and nesting depth is 1: a step it "
                    "adds cannot be of kind run",
                }
            )
        for dep in step.depends_on:
            old = by_name.get(dep)
            if old is None or dep == adder or old.status in ADDABLE_DEP_STATUSES:
                continue
            problems.append(
                {
                    "step": step.name,
                    "field": "dependsOn",
                    "problem": f"step {dep!r} is {old.status}: an added step may depend on "
                    f"the step adding it ({adder!r}), on steps that succeeded, and on "
                    "other added steps",
                }
            )
        if step.run_if == "any_failed" and all(
            d in by_name and d != adder for d in step.depends_on
        ):
            problems.append(
                {
                    "step": step.name,
                    "field": "runIf",
                    "problem": "any_failed: every dependency has succeeded already, so the "
                    "step could only be skipped",
                }
            )
    if problems:
        raise ValidationFailed(problems, subject="added steps")
    return spec


def _added_fields(problems: list[Problem]) -> list[Problem]:
    """`parse_run`'s problems about ``steps`` said about ``addSteps``."""
    out: list[Problem] = []
    for p in problems:
        field = p.get("field") or ""
        if field == "steps" or field.startswith("steps."):
            field = "addSteps" + field[len("steps") :]
        out.append({**p, "field": field})
    return out
