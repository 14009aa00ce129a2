"""Schedules: a cron expression, an IANA time zone and a run template (issue 15, part 3).

`parse_schedule(body, ...)` turns a decoded ``POST /schedules`` body into a `ScheduleSpec`
or raises `ValidationFailed` naming every problem (``cron``, ``timezone``, ``missed``,
``run.steps[0].tool``...); nothing is written. The template is checked exactly as
``POST /runs`` checks a run (`engine.dag.parse_run`), and may not carry an
``idempotencyKey`` (each fire gets its own) nor a ``startAt`` (the fire time is the start).

Fire times (pure functions, no clock: the caller passes the database's ``now()``):

- A schedule fires once per wall-clock time of its zone that its cron expression matches
  (croniter, iterated on the zone's naive local time). Each time is stored in UTC.
- DST, autumn: a wall-clock time that happens twice fires once, at its first occurrence
  (PEP 495 ``fold=0``). ``30 2 * * *`` in Europe/Paris fires once on the night the clocks go
  back, at 02:30 CEST (00:30 UTC); ``*/30 * * * *`` fires at 02:00 and 02:30 CEST and then at
  03:00 CET (the repeated hour's wall-clock times had already fired).
- DST, spring: a wall-clock time that does not exist fires as the same wall-clock time read
  with the offset before the change (``fold=0``), that is one hour later on the wall:
  ``30 2 * * *`` in Europe/Paris fires at 03:30 CEST (01:30 UTC) on the night the clocks go
  forward. A UTC time already taken by an earlier wall-clock time is never fired twice.

Missed fires (the leader was down, or slow): every fire time between the schedule's
``next_fire_at`` and now is due. `due_fires` keeps the newest ``catch_up`` of them, oldest
first, and counts the others as missed; ``"missed": "skip"`` is a catch-up of 1 (only the
newest due time fires: a schedule that was not late fires its one time as usual).
"""

from __future__ import annotations

import heapq
import re
import uuid
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from croniter import croniter
from croniter.croniter import CroniterError

from engine.dag import Problem, RunSpec, parse_run, text_problems
from engine.errors import ValidationFailed

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.:\-]{0,127}$"
CATCH_UP_MAX = 1000  # the largest catch-up limit a schedule may ask for
# At most this many fire times are walked for one schedule in one pass (an every-minute
# schedule whose leader was down a week; about 0.3 s of croniter): past it, the pass only
# moves next_fire_at on and counts the times as missed; the next pass goes on from there.
SCAN_MAX = 10_000
# How far either side of a point in time the naive wall-clock walk starts, so that a DST
# change (at most a few hours anywhere) cannot hide a fire time.
_DST_MARGIN = timedelta(hours=3)

Policy = Literal["skip", "catch_up"]


@dataclass(frozen=True)
class ScheduleSpec:
    """A parsed ``POST /schedules`` body: `name`, `cron` (5 fields, croniter), `timezone`
    (IANA name), `template` (the ``POST /runs`` body each fire submits, as given, without an
    idempotency key), `policy` (``skip`` or ``catch_up``) and `catch_up` (how many missed
    fire times one pass fires at most: 1 for ``skip``)."""

    name: str
    cron: str
    timezone: str
    template: dict[str, Any]
    policy: Policy
    catch_up: int

    def definition(self) -> dict[str, Any]:
        """What two submissions of one schedule must agree on (name aside): a repeated
        ``POST /schedules`` with the same definition returns the existing schedule."""
        return {
            "cron": self.cron,
            "timezone": self.timezone,
            "template": self.template,
            "policy": self.policy,
            "catch_up": self.catch_up,
        }


def id_of(ref: str) -> str | None:
    """A schedule reference of a path (``/schedules/{scheduleId}``: an id or a name) as a
    canonical UUID, or None when it is not one (then it is a name: names never read as a
    UUID, `parse_schedule` refuses them)."""
    try:
        return str(uuid.UUID(ref))
    except ValueError:
        return None


def _problem(field: str, problem: str) -> Problem:
    return {"step": None, "field": field, "problem": problem}


def zone(name: str) -> ZoneInfo:
    """The IANA zone `name`; raises `ValueError` for a name that is not one."""
    if not name or name.startswith("/") or ".." in name:  # zoneinfo reads files by name
        raise ValueError(f"unknown time zone {name!r}")
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError, OSError):
        raise ValueError(
            f"unknown time zone {name!r}; use an IANA name such as Europe/Paris"
        ) from None


def check_cron(expr: str) -> str | None:
    """Why `expr` is not a 5-field cron expression croniter accepts, or None when it is."""
    if len(expr.split()) != 5:
        return "must have 5 fields (minute hour day-of-month month day-of-week)"
    try:
        croniter(expr)
    except (CroniterError, ValueError, KeyError) as exc:
        return f"not a valid cron expression: {exc}"
    try:
        next_fire(expr, "UTC", datetime(2000, 1, 1, tzinfo=UTC))
    except ValueError:
        return "matches no date (e.g. 30 February): it would never fire"
    return None


def _template_problems(problems: list[Problem], body: Any) -> list[Problem]:
    """`parse_run`'s problems renamed under ``run``: ``run.steps[<i>].<field>`` for a step's,
    ``run.<field>`` for the run's."""
    steps = body.get("steps") if isinstance(body, dict) else None
    index: dict[str, int] = {}
    if isinstance(steps, list):
        for i, s in enumerate(steps):
            name = s.get("name") if isinstance(s, dict) else None
            if isinstance(name, str):
                index.setdefault(name, i)
    renamed: list[Problem] = []
    for p in problems:
        step = p.get("step")
        field = p.get("field") or ""
        if step is not None:
            at = index.get(step)
            if at is None and step.startswith("#") and step[1:].isdigit():
                at = int(step[1:])
            where = f"run.steps[{at}]" if at is not None else "run.steps"
            renamed.append({**p, "field": f"{where}.{field}" if field != "step" else where})
        else:
            whole = field in ("", "body")  # the template itself is not an object
            renamed.append({**p, "field": "run" if whole else f"run.{field}"})
    return renamed


def parse_template(
    template: Any, *, max_steps: int, remote_tools: frozenset[str] = frozenset()
) -> RunSpec:
    """Check a run template as ``POST /runs`` checks a run (`engine.dag.parse_run`; tools in
    `remote_tools` are accepted unchecked) and refuse an ``idempotencyKey`` or ``startAt``.
    Raises `ValidationFailed` with the problems named under ``run``."""
    problems: list[Problem] = []
    if isinstance(template, dict):
        for key, why in (
            ("idempotencyKey", "each fire gets its own (schedule:<id>:<fire time>)"),
            ("startAt", "a scheduled run starts at its fire time"),
        ):
            if key in template:
                problems.append(_problem(f"run.{key}", f"not allowed in a schedule: {why}"))
    try:
        spec = parse_run(template, max_steps=max_steps, remote_tools=remote_tools)
    except ValidationFailed as exc:
        problems.extend(_template_problems(exc.problems, template))
        raise ValidationFailed(problems, subject="schedule") from None
    if problems:
        raise ValidationFailed(problems, subject="schedule")
    return spec


def parse_schedule(
    body: Any, *, max_steps: int, remote_tools: frozenset[str] = frozenset()
) -> ScheduleSpec:
    """Validate a decoded ``POST /schedules`` body::

        {"name": "nightly", "cron": "0 3 * * *", "timezone": "Europe/Paris",
         "run": {<a POST /runs body without idempotencyKey or startAt>},
         "missed": "skip" | {"catchUp": N}}

    ``timezone`` defaults to ``UTC``, ``missed`` to ``skip``; N is 1..`CATCH_UP_MAX`. A name
    that reads as a UUID is refused (paths take an id or a name). Raises `ValidationFailed`
    listing every problem (``name``, ``cron``, ``timezone``, ``missed``, ``run...``)."""
    if not isinstance(body, dict):
        raise ValidationFailed([_problem("body", "must be a JSON object")], subject="schedule")
    bad_text = text_problems({k: v for k, v in body.items() if k != "run"}, runs=False)
    if bad_text:
        raise ValidationFailed(bad_text, subject="schedule")
    problems: list[Problem] = []
    known = {"name", "cron", "timezone", "run", "missed"}
    problems.extend(_problem(k, "unknown field") for k in body if k not in known)

    name = body.get("name")
    if not isinstance(name, str) or not re.fullmatch(NAME_PATTERN, name):
        problems.append(
            _problem("name", f"must be a string matching {NAME_PATTERN} (1 to 128 characters)")
        )
    else:
        try:
            uuid.UUID(name)
        except ValueError:
            pass
        else:
            problems.append(
                _problem("name", "must not read as a UUID (paths take an id or a name)")
            )
    cron = body.get("cron")
    if not isinstance(cron, str):
        problems.append(_problem("cron", "must be a cron expression string, e.g. '0 3 * * *'"))
    else:
        cron = " ".join(cron.split())
        why = check_cron(cron)
        if why:
            problems.append(_problem("cron", why))
    tz = body.get("timezone", "UTC")
    if not isinstance(tz, str):
        problems.append(_problem("timezone", "must be an IANA time zone name, e.g. Europe/Paris"))
    else:
        try:
            zone(tz)
        except ValueError as exc:
            problems.append(_problem("timezone", str(exc)))
    missed = body.get("missed", "skip")
    policy: Policy = "skip"
    catch_up = 1
    if missed == "skip":
        pass
    elif (
        isinstance(missed, dict)
        and set(missed) == {"catchUp"}
        and isinstance(missed["catchUp"], int)
        and not isinstance(missed["catchUp"], bool)
        and 1 <= missed["catchUp"] <= CATCH_UP_MAX
    ):
        policy, catch_up = "catch_up", missed["catchUp"]
    else:
        problems.append(
            _problem(
                "missed", f'must be "skip" or {{"catchUp": N}} with N from 1 to {CATCH_UP_MAX}'
            )
        )
    template = body.get("run")
    if "run" not in body:
        problems.append(_problem("run", "required: the POST /runs body each fire submits"))
    else:
        try:
            parse_template(template, max_steps=max_steps, remote_tools=remote_tools)
        except ValidationFailed as exc:
            problems.extend(exc.problems)
    if problems:
        raise ValidationFailed(problems, subject="schedule")
    assert isinstance(name, str) and isinstance(cron, str) and isinstance(tz, str)
    assert isinstance(template, dict)
    return ScheduleSpec(
        name=name, cron=cron, timezone=tz, template=template, policy=policy, catch_up=catch_up
    )


# --- fire times ------------------------------------------------------------------------------


def _utc_of(naive: datetime, tz: ZoneInfo) -> datetime:
    """The UTC time of wall-clock time `naive` in `tz`, first occurrence (fold=0)."""
    return naive.replace(tzinfo=tz, fold=0).astimezone(UTC)


def fire_times(cron: str, timezone: str, after: datetime) -> Iterator[datetime]:
    """Every fire time (UTC, increasing, each once) strictly later than `after` (aware) of
    `cron` in `timezone`, by the rules in this module's docstring.

    One croniter walk over the zone's naive wall-clock times, each read with ``fold=0``.
    Around a DST change that reading is not monotonic (a wall-clock time in the spring gap
    maps to a later UTC time than the next hour's), but never by more than `_DST_MARGIN`:
    a time is yielded once the walk is that far past it, so no earlier one can follow.
    Raises `ValueError` for an unknown zone, a bad expression, or one that matches no date
    (``0 0 30 2 *``)."""
    tz = zone(timezone)
    after = after.astimezone(UTC)
    try:
        it = croniter(cron, after.astimezone(tz).replace(tzinfo=None) - _DST_MARGIN)
    except (CroniterError, KeyError) as exc:
        raise ValueError(f"bad cron expression {cron!r}: {exc}") from None
    heap: list[datetime] = []
    queued: set[datetime] = set()
    last = after
    while True:
        try:
            naive: datetime = it.get_next(datetime)
        except CroniterError as exc:  # matches no date at all
            raise ValueError(f"cron expression {cron!r} never fires: {exc}") from None
        at = _utc_of(naive, tz)
        if at > last and at not in queued:
            heapq.heappush(heap, at)
            queued.add(at)
        while heap and heap[0] < at - _DST_MARGIN:
            last = heapq.heappop(heap)
            queued.discard(last)
            yield last


def next_fire(cron: str, timezone: str, after: datetime) -> datetime:
    """The first fire time (UTC) strictly later than `after` (aware) of `cron` in
    `timezone` (`fire_times`). Raises `ValueError` for an unknown zone, a bad expression or
    one that never fires."""
    return next(fire_times(cron, timezone, after))


@dataclass(frozen=True)
class DueFires:
    """What one pass does for one schedule: `fire_at` (UTC, oldest first) to fire now,
    `missed` fire times left unfired (older than those), and `next_fire_at`, the first fire
    time after the pass."""

    fire_at: list[datetime]
    missed: int
    next_fire_at: datetime


def due_fires(
    cron: str, timezone: str, *, next_fire_at: datetime, now: datetime, catch_up: int
) -> DueFires:
    """The fire times due at `now` (database clock) of a schedule whose first unfired time
    is `next_fire_at`: the newest `catch_up` of them fire, oldest first; the rest are missed.
    Walks at most `SCAN_MAX` times: past that, nothing fires and `next_fire_at` moves on (the
    next pass goes on). Raises `ValueError` for an unknown zone or a bad expression."""
    if next_fire_at > now:
        return DueFires([], 0, next_fire_at)
    keep: deque[datetime] = deque([next_fire_at], maxlen=catch_up)
    seen = 1
    for at in fire_times(cron, timezone, next_fire_at):
        if at > now:
            return DueFires(list(keep), seen - len(keep), at)
        if seen >= SCAN_MAX:
            return DueFires([], seen, at)
        keep.append(at)
        seen += 1
    raise AssertionError("fire_times never ends")


def fire_key(schedule_id: str, fire_at: datetime) -> str:
    """The idempotency key of the run a fire submits: ``schedule:<id>:<fire time, UTC ISO>``."""
    return f"schedule:{schedule_id}:{fire_at.astimezone(UTC).isoformat()}"


def fire_body(
    template: dict[str, Any], *, name: str, schedule_id: str, fire_at: datetime
) -> dict[str, Any]:
    """The ``POST /runs`` body of one fire: the template with its idempotency key and, when
    the template has no goal, ``schedule <name> at <fire time>``."""
    body = dict(template)
    body["idempotencyKey"] = fire_key(schedule_id, fire_at)
    if not body.get("goal"):
        body["goal"] = f"schedule {name} at {fire_at.astimezone(UTC).isoformat()}"
    return body
