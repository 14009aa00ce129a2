"""`engine.schedules` without a database: the body checks (every problem named, as POST
/runs names them), fire times across DST changes (a fixed base time, no waiting), and the
missed-fire policy (`due_fires`)."""

from __future__ import annotations

import collections
import itertools
from datetime import UTC, date, datetime, timedelta
from typing import Any

import pytest

from engine.errors import ValidationFailed
from engine.schedules import (
    SCAN_MAX,
    due_fires,
    fire_body,
    fire_key,
    fire_times,
    next_fire,
    parse_schedule,
)
from engine.tools import load_tool_modules

load_tool_modules(["workers.tools.builtin"])

RUN = {"steps": [{"name": "wait", "tool": "DELAY", "input": {"ms": 1}}]}


def _problems(body: Any) -> list[dict[str, Any]]:
    with pytest.raises(ValidationFailed) as info:
        parse_schedule(body, max_steps=100)
    return info.value.problems


def _utc(*args: int) -> datetime:
    return datetime(*args, tzinfo=UTC)


def test_a_good_body_parses_with_its_defaults() -> None:
    spec = parse_schedule({"name": "n1", "cron": "0  3 * * *", "run": RUN}, max_steps=100)
    assert (spec.cron, spec.timezone, spec.policy, spec.catch_up) == ("0 3 * * *", "UTC", "skip", 1)
    spec = parse_schedule(
        {
            "name": "n2",
            "cron": "* * * * *",
            "timezone": "Asia/Tokyo",
            "run": RUN,
            "missed": {"catchUp": 7},
        },
        max_steps=100,
    )
    assert (spec.policy, spec.catch_up) == ("catch_up", 7)


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"timezone": "Mars/Olympus"}, "timezone"),
        ({"timezone": "../../etc/passwd"}, "timezone"),
        ({"timezone": 3}, "timezone"),
        ({"cron": "61 * * * *"}, "cron"),
        ({"cron": "* * * *"}, "cron"),
        ({"cron": None}, "cron"),
        ({"cron": "0 0 30 2 *"}, "cron"),  # 30 February: it would never fire
        ({"name": ""}, "name"),
        ({"name": "3f1c0a4e-1b7e-4c5e-9a55-5b2f5b6a0c11"}, "name"),
        ({"missed": "later"}, "missed"),
        ({"missed": {"catchUp": 0}}, "missed"),
        ({"missed": {"catchUp": True}}, "missed"),
        ({"missed": {"catchUp": 1001}}, "missed"),
        ({"extra": 1}, "extra"),
    ],
)
def test_each_bad_field_is_named(change: dict[str, Any], field: str) -> None:
    body = {"name": "n", "cron": "0 3 * * *", "timezone": "UTC", "run": RUN, **change}
    assert [p["field"] for p in _problems(body)] == [field]


def test_template_problems_are_named_under_run() -> None:
    body = {
        "name": "n",
        "cron": "0 3 * * *",
        "timezone": "Nowhere/Land",
        "run": {
            "idempotencyKey": "k",
            "steps": [
                {"name": "a", "tool": "DELAY", "input": {"ms": 1}},
                {"name": "b", "tool": "NO_SUCH_TOOL", "input": {}, "dependsOn": ["a"]},
            ],
        },
    }
    fields = {p["field"] for p in _problems(body)}
    assert fields == {"timezone", "run.idempotencyKey", "run.steps[1].tool"}, fields
    assert {p["field"] for p in _problems({"name": "n", "cron": "* * * * *"})} == {"run"}
    bad_input = {
        "name": "n",
        "cron": "* * * * *",
        "run": {"steps": [{"name": "a", "tool": "DELAY", "input": {"ms": -1}}]},
    }
    assert [p["field"] for p in _problems(bad_input)] == ["run.steps[0].input.ms"]
    assert [p["field"] for p in _problems([1])] == ["body"]
    assert [p["field"] for p in _problems({"name": "n", "cron": "* * * * *", "run": None})] == [
        "run"
    ]


def test_fire_times_in_a_zone_are_stored_in_utc() -> None:
    # 03:00 in Paris in winter is 02:00 UTC; in summer 01:00 UTC.
    assert next_fire("0 3 * * *", "Europe/Paris", _utc(2026, 1, 10, 12)) == _utc(2026, 1, 11, 2)
    assert next_fire("0 3 * * *", "Europe/Paris", _utc(2026, 7, 10, 12)) == _utc(2026, 7, 11, 1)
    # strictly after: a fire time is not its own next
    assert next_fire("0 3 * * *", "UTC", _utc(2026, 1, 1, 3)) == _utc(2026, 1, 2, 3)


def test_dst_autumn_a_repeated_wall_clock_time_fires_once() -> None:
    # Paris, 2026-10-25: 03:00 CEST -> 02:00 CET (01:00 UTC). 02:30 happens twice.
    after = _utc(2026, 10, 24, 12)
    first = next_fire("30 2 * * *", "Europe/Paris", after)
    assert first == _utc(2026, 10, 25, 0, 30)  # 02:30 CEST, the first occurrence
    assert next_fire("30 2 * * *", "Europe/Paris", first) == _utc(2026, 10, 26, 1, 30)
    # every 30 minutes: 02:00 and 02:30 CEST fire, their repeats (CET) do not, 03:00 CET does
    times, at = [], _utc(2026, 10, 24, 23, 59)
    for _ in range(4):
        at = next_fire("*/30 * * * *", "Europe/Paris", at)
        times.append(at)
    assert times == [
        _utc(2026, 10, 25, 0, 0),
        _utc(2026, 10, 25, 0, 30),
        _utc(2026, 10, 25, 2, 0),
        _utc(2026, 10, 25, 2, 30),
    ]


def test_dst_spring_a_missing_wall_clock_time_fires_an_hour_later_once() -> None:
    # Paris, 2026-03-29: 02:00 CET -> 03:00 CEST (01:00 UTC). 02:30 does not exist.
    first = next_fire("30 2 * * *", "Europe/Paris", _utc(2026, 3, 28, 12))
    assert first == _utc(2026, 3, 29, 1, 30)  # 03:30 CEST
    assert next_fire("30 2 * * *", "Europe/Paris", first) == _utc(2026, 3, 30, 0, 30)
    # every 30 minutes across the gap: no UTC time twice, none out of order
    times, at = [], _utc(2026, 3, 29, 0, 0)
    for _ in range(4):
        at = next_fire("*/30 * * * *", "Europe/Paris", at)
        times.append(at)
    assert times == [
        _utc(2026, 3, 29, 0, 30),
        _utc(2026, 3, 29, 1, 0),
        _utc(2026, 3, 29, 1, 30),
        _utc(2026, 3, 29, 2, 0),
    ]


def test_due_fires_skip_and_catch_up() -> None:
    start = _utc(2026, 5, 1, 10, 0)
    now = start + timedelta(minutes=9, seconds=30)  # 10 fire times due: 10:00 .. 10:09
    skip = due_fires("* * * * *", "UTC", next_fire_at=start, now=now, catch_up=1)
    assert skip.fire_at == [_utc(2026, 5, 1, 10, 9)]
    assert skip.missed == 9
    assert skip.next_fire_at == _utc(2026, 5, 1, 10, 10)
    caught = due_fires("* * * * *", "UTC", next_fire_at=start, now=now, catch_up=3)
    assert caught.fire_at == [_utc(2026, 5, 1, 10, m) for m in (7, 8, 9)]
    assert caught.missed == 7
    all_ = due_fires("* * * * *", "UTC", next_fire_at=start, now=now, catch_up=100)
    assert len(all_.fire_at) == 10 and all_.missed == 0
    not_yet = due_fires(
        "* * * * *", "UTC", next_fire_at=now + timedelta(seconds=1), now=now, catch_up=5
    )
    assert not_yet.fire_at == [] and not_yet.next_fire_at == now + timedelta(seconds=1)
    on_time = due_fires("* * * * *", "UTC", next_fire_at=start, now=start, catch_up=1)
    assert on_time.fire_at == [start] and on_time.missed == 0


def test_fire_body_keys_and_goal() -> None:
    at = _utc(2026, 5, 1, 10, 0)
    assert fire_key("abc", at) == "schedule:abc:2026-05-01T10:00:00+00:00"
    body = fire_body(RUN, name="n", schedule_id="abc", fire_at=at)
    assert body["idempotencyKey"] == fire_key("abc", at)
    assert body["goal"] == "schedule n at 2026-05-01T10:00:00+00:00"
    assert "idempotencyKey" not in RUN  # the template is not changed
    assert fire_body({**RUN, "goal": "g"}, name="n", schedule_id="a", fire_at=at)["goal"] == "g"


def test_a_year_of_fire_times_increases_through_both_dst_changes() -> None:
    # Offsets are whole hours, so each UTC hour is a wall-clock hour: it fires unless its
    # wall-clock time is the autumn repeat (fold=1). The spring gap's wall-clock time read
    # with fold=0 lands on the UTC time the next wall-clock hour has: once.
    year = list(
        itertools.takewhile(
            lambda t: t < _utc(2027, 1, 1),
            fire_times("0 * * * *", "Europe/Paris", _utc(2025, 12, 31, 23, 59)),
        )
    )
    assert all(a < b for a, b in itertools.pairwise(year))
    per_day = collections.Counter(t.date() for t in year)
    assert per_day[date(2026, 10, 25)] == 23  # 01:00 UTC is 02:00 CET, a repeat
    assert per_day[date(2026, 3, 29)] == 24
    assert set(per_day.values()) == {24, 23}
    assert len(year) == 365 * 24 - 1


def test_due_fires_walks_a_bounded_number_of_times_per_pass() -> None:
    start = _utc(2026, 1, 1)
    now = start + timedelta(minutes=SCAN_MAX + 500)
    first = due_fires("* * * * *", "UTC", next_fire_at=start, now=now, catch_up=5)
    assert first.fire_at == [] and first.missed == SCAN_MAX
    assert first.next_fire_at == start + timedelta(minutes=SCAN_MAX)
    second = due_fires("* * * * *", "UTC", next_fire_at=first.next_fire_at, now=now, catch_up=5)
    assert second.fire_at == [start + timedelta(minutes=SCAN_MAX + m) for m in range(496, 501)]
    assert second.missed == 496


def test_an_unknown_zone_raises_value_error() -> None:
    with pytest.raises(ValueError, match="unknown time zone"):
        next_fire("* * * * *", "Nowhere/Land", _utc(2026, 1, 1))
