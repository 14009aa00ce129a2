"""The listener's frontier (engine.live.EventHub._merge) fed by hand: reads in which ids
commit out of order, roll back, or stall. No database: what a read returns is scripted."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime
from typing import Any

from engine.live import EventHub, LiveEvent

RUN = str(uuid.UUID(int=1))


def row(event_id: int, run_id: str = RUN) -> dict[str, Any]:
    return {
        "id": event_id,
        "run_id": run_id,
        "step_id": None,
        "step_name": f"s{event_id}",
        "event": "step_ready",
        "from_status": "pending",
        "to_status": "ready",
        "attempt": 0,
        "lease_token": None,
        "worker_id": None,
        "detail": None,
        "created_at": datetime(2026, 1, 1, tzinfo=UTC),
    }


class Harness:
    """A hub started at frontier `start` with one subscription to everything."""

    def __init__(self, start: int = 0, stall_s: float = 5.0) -> None:
        self.hub = EventHub("postgresql://unused", stall_s=stall_s)
        st = self.hub._state
        st.frontier = st.known = start
        self.hub._startup_xid = 0
        self.sub = self.hub.subscribe(None)
        self.now = 100.0

    def read(
        self, ids: list[int], xmin: int, probe: int | None = None, dt: float = 0.01
    ) -> list[int]:
        """Merge a read of `ids` whose snapshot's oldest running xid is `xmin` (and which
        took the probe xid `probe`); returns the ids offered to the subscription."""
        self.now += dt
        self.hub._merge([row(i) for i in sorted(ids)], xmin, probe, self.now)  # type: ignore[misc]
        return [e.id for e in self.sub.take(10_000)]


def test_in_order_commits_go_straight_through() -> None:
    h = Harness()
    assert h.read([1, 2, 3], 50) == [1, 2, 3]
    assert h.hub.frontier == 3
    assert not h.hub._want_probe(h.now + 1)


def test_a_lower_id_committing_later_is_waited_for_then_delivered_first() -> None:
    h = Harness()
    # B (id 2) committed, A (id 1) still in flight: nothing goes out.
    assert h.read([2], 50) == []
    assert h.hub.frontier == 0
    assert not h.hub._want_probe(h.now)  # a fresh gap is not probed yet
    assert h.hub._want_probe(h.now + 0.05)
    assert h.read([], 50, probe=70, dt=0.05) == []
    assert not h.hub._want_probe(h.now + 1)  # covered by that probe
    # A (xid 55) still runs: nothing is settled.
    assert h.read([], 55) == []
    # A commits; the re-read of the gap finds id 1: both go out, in id order.
    assert h.read([1], 60) == [1, 2]
    assert h.hub.frontier == 2


def test_a_rolled_back_id_is_settled_once_everything_older_than_the_probe_ended() -> None:
    h = Harness()
    assert h.read([2, 3], 50) == []
    assert h.read([], 50, probe=70, dt=0.05) == []
    # Transactions older than the probe may still run (xmin 70 is not > 70).
    assert h.read([], 70) == []
    # Every transaction that could hold id 1 has ended and id 1 is still not visible: it
    # rolled back, and 2 and 3 go out.
    assert h.read([], 71) == [2, 3]
    assert h.hub.frontier == 3


def test_snapshot_xmax_alone_never_settles_a_gap() -> None:
    """The bug this design avoids: with no probe, a high xmin proves nothing."""
    h = Harness()
    assert h.read([2], 50) == []
    for xmin in (100, 1000, 10_000):
        assert h.read([], xmin) == []
    assert h.read([1], 10_001) == [1, 2]


def test_a_gap_partly_filled_keeps_holding_what_is_above_it() -> None:
    h = Harness()
    assert h.read([4], 50) == []
    assert h.read([], 50, probe=80, dt=0.05) == []
    assert h.read([1], 60) == [1]  # ids 2 and 3 still open hold 4 back
    assert h.hub.frontier == 1
    assert h.read([3], 81) == [3, 4]  # 3 committed, 2 rolled back (settled by the probe)


def test_a_row_read_twice_is_offered_once() -> None:
    h = Harness()
    assert h.read([1, 3], 50) == [1]
    assert h.read([2], 50) == [2, 3]
    assert h.read([2], 60) == []  # a re-read of an already settled range


def test_per_run_subscription_sees_only_its_run() -> None:
    h = Harness()
    other = str(uuid.UUID(int=2))
    mine = h.hub.subscribe(RUN)
    h.hub._merge([row(1, RUN), row(2, other), row(3, RUN)], 50, None, 1.0)  # type: ignore[misc]
    assert [e.id for e in mine.take(100)] == [1, 3]


def test_a_gap_open_longer_than_stall_s_stops_holding_events_back() -> None:
    h = Harness(stall_s=1.0)
    assert h.read([2], 50) == []
    assert h.read([3], 50, probe=90, dt=0.5) == []
    # Past stall_s the frontier goes past id 1.
    assert h.read([], 50, dt=0.6) == [2, 3]
    assert h.hub.frontier == 3
    # If its transaction commits after all, the event is delivered late, marked as such.
    h.now += 0.1
    h.hub._merge([row(1)], 50, None, h.now)  # type: ignore[misc]
    late = h.sub.take(10)
    assert [(e.id, e.late) for e in late] == [(1, True)]
    assert h.hub.frontier == 3


def test_a_subscriber_more_than_the_capacity_behind_overflows() -> None:
    h = Harness()
    h.hub = EventHub("postgresql://unused", queue_max_events=3)
    h.hub._startup_xid = 0
    h.sub = h.hub.subscribe(None)
    other = h.hub.subscribe(None)
    assert h.read([1, 2], 50) == [1, 2]
    assert h.read([3], 50) == [3]  # `other` has taken nothing: 3 behind, the capacity
    assert not other.overflowed and len(other) == 3
    assert h.read([4], 50) == [4]  # now 4 behind: event 1 is gone for it
    assert not h.sub.overflowed
    assert other.overflowed and len(other) == 0 and other.take(10) == []
    start = other.restart()
    assert start == 4 and not other.overflowed and h.hub.overflows == 1
    assert h.read([5], 50) == [5]
    assert [e.id for e in other.take(10)] == [5]


def test_subscribers_taking_the_same_events_share_one_batch_frame() -> None:
    h = Harness()
    other = h.hub.subscribe(None)
    h.hub._merge([row(1), row(2)], 50, None, 1.0)  # type: ignore[misc]
    events_a, text_a = h.sub.take_batch(100)
    events_b, text_b = other.take_batch(100)
    assert [e.id for e in events_a] == [e.id for e in events_b] == [1, 2]
    assert text_a is text_b
    assert json.loads(text_a) == {"type": "events", "events": [e.data for e in events_a]}


def test_event_message_is_the_events_endpoint_shape() -> None:
    event = LiveEvent.from_row(row(7))  # type: ignore[arg-type]
    assert set(event.data) == {
        "id",
        "runId",
        "stepName",
        "event",
        "fromStatus",
        "toStatus",
        "attempt",
        "leaseToken",
        "workerId",
        "detail",
        "at",
    }
    assert event.message.startswith('{"type": "event", "event": {"id": 7,')


def test_events_are_built_only_for_watched_streams(monkeypatch: Any) -> None:
    """With nobody subscribed the hub still advances its frontier, but builds no event
    (parsing and serialising every audit row was a fifth of the API's CPU under load); a
    per-run stream gets events built for its own run only."""
    built: list[int] = []
    original = LiveEvent.from_row.__func__  # type: ignore[attr-defined]

    def counting(cls: type[LiveEvent], r: Any, *, late: bool = False) -> LiveEvent:
        built.append(r["id"])
        return original(cls, r, late=late)  # type: ignore[no-any-return]

    monkeypatch.setattr(LiveEvent, "from_row", classmethod(counting))
    hub = EventHub("postgresql://unused")
    hub._startup_xid = 0
    hub._merge([row(1), row(2)], 50, None, 1.0)  # type: ignore[misc]
    assert hub.frontier == 2 and hub.delivered == 2 and built == []
    other = str(uuid.UUID(int=2))
    mine = hub.subscribe(RUN)
    hub._merge([row(3, other), row(4, RUN)], 50, None, 1.1)  # type: ignore[misc]
    assert built == [4] and [e.id for e in mine.take(10)] == [4]
    everything = hub.subscribe(None)
    hub._merge([row(5, other), row(6, RUN)], 50, None, 1.2)  # type: ignore[misc]
    assert built == [4, 5, 6]  # once each, shared by both streams
    assert [e.id for e in everything.take(10)] == [5, 6] and [e.id for e in mine.take(10)] == [6]
    assert everything.take(0) == [] and mine._log.slice(1, 1)[0] is everything._log.slice(1, 1)[0]
