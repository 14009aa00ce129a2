"""Live events: one LISTEN connection per API process, fanned out to its WebSocket clients.

`EventHub` owns a dedicated Postgres connection (autocommit) that runs
``LISTEN pgdag_events`` and a task that turns notifications into events on the bounded
queues (`Subscription`) of every WebSocket client of this process.

A notification is only a wake-up
--------------------------------
The audit-log trigger NOTIFYs once per run per statement, in the writing transaction, so
notifications arrive in commit order, carry ids only, and are lost while the listener is
disconnected. The listener never trusts their payload: each wake-up runs ONE read
(`engine.store.read_live_events`) shared by every client, and the audit log itself is the
source of truth. Reconnecting after a Postgres restart or a dropped socket is therefore a
plain read of what was committed meanwhile: nothing is lost and clients need no resync
(unless that backlog overflows their queue; see below).

Why a plain ``id > last_seen`` cursor is wrong, and what the listener does instead
----------------------------------------------------------------------------------
audit_log ids come from a sequence when the row is inserted, not when its transaction
commits. Transaction A takes id 10, B takes id 11, B commits, the listener reads
``id > 9`` and sees 11; A commits later and a cursor now at 11 never reads 10.

The listener keeps a *frontier* F: every audit id <= F is resolved, meaning its row was
read and handed to the subscribers, or it will never commit. It tracks

- ``known``: the highest id it has read;
- ``pending``: rows read with id > F, held back until the ids below them are resolved;
- ``gaps``: id ranges in (F, known] it has not read. A gap id g below a row h it has read
  was taken before h (one sequence); it belongs to a transaction still in flight, to one
  that rolled back, or to one that committed but was not visible to that read.

Every read re-reads the gaps and reports ``snap_xmin``, the oldest transaction id still
running under the snapshot of that same statement. Most gaps fill within milliseconds,
when the transaction holding the id commits and its notification wakes the listener. A
gap still open after `PROBE_AFTER_S` gets a *probe*: the next read also takes a
transaction id X for itself (``pg_current_xact_id()``, after its snapshot), so X is larger
than the id of every transaction that had taken one of the gap's ids. The gap is settled by
the first later read j with ``snap_xmin_j > X``: every such transaction has ended, so the
gap ids that committed are visible to read j (and were just read), and those still missing
rolled back (or were skipped, as a sequence does after a crash). Then F advances over
everything resolved and the held rows go out in id order.

(Why not ``pg_snapshot_xmax``: it is the newest *completed* transaction id + 1, and
transactions with larger ids may be running and unlisted; a probe costs one transaction
id, which is why only lingering gaps get one.)

This relies on one property of the writers, which every transition in
`engine.transitions` has: a transaction gets its transaction id (by updating or locking a
row) before it takes an audit id. (An INSERT into audit_log as the very first write of a
transaction would take the id a few microseconds before the transaction id.)

Order and exactness
-------------------
Events reach clients in audit-id order. For two transactions that touched the same step
(or the same run row) id order is their commit order, because the later one waited for the
earlier one's row lock before taking its id; only transactions that touched nothing in
common can come out in an order other than their commits, and no reader can tell. In
exchange, an event id is an exact cursor: a client that has received event N has received
every event with id <= N (of its stream), which is what ``lastEventId`` and ``?after=``
mean (see `engine.ws`).

A transaction that takes an audit id and then stays open (a worker partitioned from
Postgres mid-transaction) would hold every later event back. After `stall_s` the
listener stops waiting for that gap: the frontier passes it and, should it commit after
all, its rows are delivered late, out of id order (logged as a warning). A client that
reconnected with ``after=`` in between would not get them; that is the one bounded
exception to the cursor guarantee.

Bounded queues
--------------
Each event is parsed and serialised once (and only when some client watches its stream) and
appended, without awaiting, to one shared
`EventLog` per stream (every run, and each run somebody watches); a `Subscription` is only
a position in it, so fanning an event out costs the same for 1 or 1,000 clients. A log
keeps its last `queue_max_events` events: a client whose sender falls further behind (its
socket is full) has lost its place, is marked overflowed, and its WebSocket sender tells
it ``resync`` and resynchronises it. Memory is therefore bounded whatever the clients do,
and a slow client slows nobody else.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import psycopg
from psycopg.rows import DictRow, dict_row

from engine import metrics
from engine.db import Backoff
from engine.store import event_json, read_live_events, setup_live_session, start_live

logger = logging.getLogger(__name__)

CHANNEL = "pgdag_events"
QUEUE_MAX_EVENTS_DEFAULT = 5_000
FETCH_LIMIT = 1_000  # rows per read; a queue must hold more than one read
IDLE_POLL_S_DEFAULT = 1.0  # a read (and a liveness check) at least this often when quiet
GAP_POLL_S = 0.02  # while some gap is open: read again this often to settle it
PROBE_AFTER_S = 0.03  # a gap open this long gets a probe xid (see EventHub._want_probe)
STALL_S_DEFAULT = 5.0  # stop holding events back for a gap older than this
QUERY_TIMEOUT_S = 10.0  # a read that takes longer means a dead socket: reconnect
CONNECT_TIMEOUT_S = 10
RECONNECT_FIRST_S = 0.5  # first pause after a failure; doubles (jittered) up to the cap
RECONNECT_MAX_S = 5.0


@dataclass(frozen=True, slots=True)
class LiveEvent:
    """One audit-log event as the API shows it (`data`, the shape of an item of
    ``GET /runs/{id}/events``), with its JSON text and its ``{"type": "event", ...}`` frame
    serialised once for every client.

    `late` marks an event delivered after the frontier had passed its id (see the module
    docstring): it is never filtered out as already seen.
    """

    id: int
    run_id: str
    data: dict[str, Any]
    text: str
    message: str
    late: bool = False

    @classmethod
    def from_row(cls, row: DictRow, *, late: bool = False) -> LiveEvent:
        """Build from an audit_log row (any query selecting `event_json`'s columns)."""
        data = event_json(row)
        text = json.dumps(data)
        return cls(
            id=data["id"],
            run_id=data["runId"],
            data=data,
            text=text,
            message='{"type": "event", "event": ' + text + "}",
            late=late,
        )


def batch_message(events: Sequence[LiveEvent]) -> str:
    """The ``{"type": "events", "events": [...]}`` frame of `events`."""
    return '{"type": "events", "events": [' + ", ".join(e.text for e in events) + "]}"


class EventLog:
    """The recent events of one stream (every run, or one run), shared by its subscribers.

    Events are numbered by arrival (`next_seq`); each `Subscription` keeps only its position.
    At most `capacity` events are kept: a subscriber that falls further behind has lost its
    place (`Subscription.overflowed`). Appending costs O(events), whatever the number of
    subscribers, and wakes them all with one event.
    """

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._events: list[LiveEvent] = []
        self.base_seq = 0  # the sequence number of _events[0]
        self._changed = asyncio.Event()
        self.subscribers = 0
        self._batch_cache: tuple[int, int, str] | None = None

    @property
    def next_seq(self) -> int:
        """The sequence number the next appended event will get."""
        return self.base_seq + len(self._events)

    def append(self, events: list[LiveEvent]) -> None:
        """Add `events`, forget the oldest past `capacity`, wake the subscribers."""
        self._events.extend(events)
        excess = len(self._events) - self.capacity
        if excess > 0:
            del self._events[:excess]
            self.base_seq += excess
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

    def slice(self, start_seq: int, limit: int) -> list[LiveEvent]:
        """Up to `limit` events from sequence number `start_seq` (>= `base_seq`)."""
        offset = start_seq - self.base_seq
        return self._events[offset : offset + limit]

    def batch_text(self, start_seq: int, events: list[LiveEvent]) -> str:
        """`batch_message` of the slice `events` taken at `start_seq`, built once for all
        the subscribers that take the same slice."""
        key_end = start_seq + len(events)
        cached = self._batch_cache
        if cached is not None and cached[0] == start_seq and cached[1] == key_end:
            return cached[2]
        text = batch_message(events)
        self._batch_cache = (start_seq, key_end, text)
        return text

    async def wait_beyond(self, seq: int) -> None:
        """Return once an event with sequence number >= `seq` exists."""
        while self.next_seq <= seq:
            await self._changed.wait()


class Subscription:
    """One client's place in an `EventLog`: of one run (`run_id`) or of all (None).

    The hub never waits for a subscriber. One that falls more than the log's capacity
    behind is `overflowed`: its events are gone and its owner must resynchronise the client
    (`restart`). Memory per subscriber is one position.
    """

    __slots__ = ("_hub", "_log", "cursor", "run_id")

    def __init__(self, hub: EventHub, log: EventLog, run_id: str | None) -> None:
        self._hub = hub
        self._log = log
        self.run_id = run_id
        self.cursor = log.next_seq

    @property
    def overflowed(self) -> bool:
        """Events this subscriber had not taken were dropped."""
        return self.cursor < self._log.base_seq

    def restart(self) -> int:
        """Skip everything queued and clear `overflowed`; returns the hub's frontier at this
        instant: every event with a larger id (and any late one) comes after this."""
        if self.overflowed:
            self._hub.overflows += 1
        self.cursor = self._log.next_seq
        return self._hub.frontier

    async def wait(self) -> None:
        """Return when events are queued or the subscription overflowed."""
        await self._log.wait_beyond(self.cursor)

    def take(self, limit: int) -> list[LiveEvent]:
        """Up to `limit` queued events, oldest first (none after an overflow)."""
        if self.overflowed:
            return []
        events = self._log.slice(self.cursor, limit)
        self.cursor += len(events)
        return events

    def take_batch(self, limit: int) -> tuple[list[LiveEvent], str]:
        """Like `take`, with the events' `batch_message` (shared with the other subscribers
        that take the same events)."""
        start = self.cursor
        events = self.take(limit)
        return events, self._log.batch_text(start, events) if events else ""

    def __len__(self) -> int:
        return 0 if self.overflowed else self._log.next_seq - self.cursor


@dataclass
class _Gap:
    lo: int
    hi: int
    opened_at: float  # monotonic seconds
    passed: bool = False  # the frontier went past it (stall); rows found now are late


@dataclass
class _State:
    """The listener's bookkeeping (see the module docstring)."""

    frontier: int = 0
    known: int = 0
    # Rows, not events: an event is built (parsed and serialised) only for a stream that
    # somebody watches (`EventHub._offer`); with no client that is most of the API's CPU
    # under load (docs/benchmarks.md, W9).
    pending: dict[int, DictRow] = field(default_factory=dict)
    gaps: list[_Gap] = field(default_factory=list)
    probes: deque[tuple[int, int]] = field(default_factory=deque)  # (probe_xid, known)


class EventHub:
    """The fan-out of one API process: a LISTEN connection to `url` and the subscriptions.

    `url` is a libpq URL or conninfo string; `queue_max_events` how many events a subscriber
    may fall behind before it overflows (per stream, events, >= one read of `FETCH_LIMIT`
    rows is sensible); `idle_poll_s` how often (seconds) the listener reads, and so checks
    its connection, when no notification comes; `stall_s` how long (seconds) events wait for
    a smaller audit id that has neither committed nor rolled back.

    `start` starts the listener task and returns at once; `ready` is set once the frontier
    is exact (every transaction that could hold an audit id when the listener started has
    ended, or `stall_s` passed). Connection loss, and a database it cannot read (no schema
    yet), are retried forever with capped exponential backoff and jitter (0.5 s .. 5 s),
    reset only once a read succeeds; one warning when the trouble starts and one when it
    ends. `attempts` counts connection attempts, `reconnects` the recoveries.
    Nothing here raises to the caller: the WebSocket side sees a frontier that does not
    advance (`wait_frontier` returns False) while Postgres is away.
    """

    def __init__(
        self,
        url: str,
        *,
        queue_max_events: int = QUEUE_MAX_EVENTS_DEFAULT,
        idle_poll_s: float = IDLE_POLL_S_DEFAULT,
        stall_s: float = STALL_S_DEFAULT,
    ) -> None:
        self.url = url
        self.queue_max_events = queue_max_events
        self.idle_poll_s = idle_poll_s
        self.stall_s = stall_s
        self.ready = asyncio.Event()
        self.reconnects = 0
        self.overflows = 0
        self.delivered = 0
        self._state = _State()
        self._started = False
        self._all = EventLog(queue_max_events)
        self._by_run: dict[str, EventLog] = {}
        self._advanced = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._conn: psycopg.AsyncConnection[DictRow] | None = None
        self._startup_xid: int | None = None
        self._started_at = 0.0
        self.attempts = 0  # connection attempts, successful or not
        self._failures = 0  # consecutive failed attempts (0: healthy)
        self._down_since = 0.0  # monotonic seconds of the first of them
        self._backoff = Backoff(RECONNECT_FIRST_S, RECONNECT_MAX_S)

    # --- subscribers ------------------------------------------------------------------------

    @property
    def frontier(self) -> int:
        """Every audit id <= this is resolved and was offered to the subscriptions."""
        return self._state.frontier

    def subscribe(self, run_id: str | None) -> Subscription:
        """A new subscription to one run's events (`run_id`) or to all (None), positioned
        after everything offered so far. `Subscription.restart` tells from which id."""
        if run_id is None:
            log = self._all
        else:
            log = self._by_run.get(run_id) or self._by_run.setdefault(
                run_id, EventLog(self.queue_max_events)
            )
        log.subscribers += 1
        return Subscription(self, log, run_id)

    def unsubscribe(self, sub: Subscription) -> None:
        """Forget `sub` (once per subscription)."""
        log = self._all if sub.run_id is None else self._by_run.get(sub.run_id)
        if log is None:
            return
        log.subscribers -= 1
        if sub.run_id is not None and log.subscribers <= 0:
            del self._by_run[sub.run_id]

    @property
    def subscribers(self) -> int:
        """How many subscriptions are open."""
        return self._all.subscribers + sum(log.subscribers for log in self._by_run.values())

    async def wait_frontier(self, event_id: int, timeout_s: float) -> bool:
        """Wait until the frontier reaches `event_id`; False after `timeout_s` seconds."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while self._state.frontier < event_id:
            remaining = deadline - loop.time()
            if remaining <= 0:
                return False
            try:
                await asyncio.wait_for(self._advanced.wait(), remaining)
            except TimeoutError:
                return False
        return True

    def stats(self) -> dict[str, int]:
        """Counters for logs and benchmarks."""
        st = self._state
        return {
            "frontier": st.frontier,
            "known": st.known,
            "pending": len(st.pending),
            "gaps": len(st.gaps),
            "subscribers": self.subscribers,
            "delivered": self.delivered,
            "overflows": self.overflows,
            "reconnects": self.reconnects,
        }

    # --- lifecycle --------------------------------------------------------------------------

    async def start(self) -> None:
        """Start the listener task (it connects, and reconnects, by itself)."""
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="pgdag-event-hub")

    async def stop(self) -> None:
        """Stop the listener and close its connection."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        await self._close()

    async def _close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(Exception):
                await conn.close()

    async def _connect(self) -> psycopg.AsyncConnection[DictRow]:
        conn = await psycopg.AsyncConnection.connect(
            self.url,
            autocommit=True,
            row_factory=dict_row,
            connect_timeout=CONNECT_TIMEOUT_S,
            application_name="pgdag-api-listener",
            keepalives=1,
            keepalives_idle=10,
            keepalives_interval=5,
            keepalives_count=3,
        )
        await conn.execute(f"LISTEN {CHANNEL}")  # a fixed identifier, never user input
        await setup_live_session(conn)
        return conn

    async def _run(self) -> None:
        """Connect, listen, read; after any failure reconnect with `self._backoff`. Logs
        only when the state changes: the first failure of an outage (warning) and the first
        good read after it (warning), never each attempt (those are debug)."""
        while True:
            self.attempts += 1
            try:
                self._conn = await self._connect()
                await self._listen(self._conn)
            except asyncio.CancelledError:
                raise
            except (psycopg.Error, OSError, TimeoutError) as exc:
                self._failures += 1
                if self._failures == 1:
                    self._down_since = time.monotonic()
                log = logger.warning if self._failures == 1 else logger.debug
                log(
                    "event listener cannot use postgres (%s: %s); reconnecting with backoff "
                    "(up to %.0fs between tries), logging again when it is back",
                    type(exc).__name__,
                    str(exc).strip().splitlines()[0] if str(exc).strip() else "",
                    RECONNECT_MAX_S,
                )
            except Exception:  # keep listening after a bug rather than go silently deaf
                self._failures += 1
                if self._failures == 1:
                    self._down_since = time.monotonic()
                logger.exception("event listener failed; restarting it with backoff")
            await self._close()
            await asyncio.sleep(self._backoff.next_delay())

    def _healthy(self) -> None:
        """A read succeeded on this connection: the outage (if any) is over."""
        if self._failures:
            self.reconnects += 1
            logger.warning(
                "event listener reconnected after %.1fs and %d failed attempt(s); "
                "reading the audit log from id %d",
                time.monotonic() - self._down_since,
                self._failures,
                self._state.known,
            )
        self._failures = 0
        self._backoff.reset()

    async def _listen(self, conn: psycopg.AsyncConnection[DictRow]) -> None:
        if not self._started:
            max_id, probe_xid = await asyncio.wait_for(start_live(conn), QUERY_TIMEOUT_S)
            self._state.frontier = self._state.known = max_id
            self._startup_xid = probe_xid
            self._started_at = time.monotonic()
            self._started = True
        await self._read(conn)
        self._healthy()
        while True:
            await self._read(conn)
            wait_s = GAP_POLL_S if (self._state.gaps or not self.ready.is_set()) else None
            timeout = wait_s if wait_s is not None else self.idle_poll_s
            # Any notification is a wake-up; those that arrived during the read wait in
            # psycopg's backlog and end this wait at once.
            async for _ in conn.notifies(timeout=timeout, stop_after=1):
                pass

    async def _read(self, conn: psycopg.AsyncConnection[DictRow]) -> None:
        """Read until caught up, then settle, advance and offer."""
        while True:
            st = self._state
            got = await asyncio.wait_for(
                read_live_events(
                    conn,
                    known=st.known,
                    gaps=[(g.lo, g.hi) for g in st.gaps],
                    limit=FETCH_LIMIT,
                    probe=self._want_probe(time.monotonic()),
                ),
                QUERY_TIMEOUT_S,
            )
            fresh = sum(1 for r in got.rows if r["id"] > st.known)
            if got.read_at is not None:
                # Every row is read once: above `known`, or when its gap fills (a late commit,
                # whose lag is the one worth seeing).
                for r in got.rows:
                    metrics.LISTEN_LAG.observe("", (got.read_at - r["created_at"]).total_seconds())
                    if r["event"] == "step_succeeded":  # the dashboard's throughput
                        metrics.COMPLETIONS.add(r["created_at"].timestamp())
            self._merge(got.rows, got.snap_xmin, got.probe_xid, time.monotonic())
            if fresh < FETCH_LIMIT:
                return

    def _want_probe(self, now: float) -> bool:
        """Whether this read should take a probe xid: some gap not yet covered by a probe has
        stayed open for `PROBE_AFTER_S` (most gaps fill sooner, and cost nothing)."""
        st = self._state
        covered = st.probes[-1][1] if st.probes else st.frontier
        return any(g.hi > covered and now - g.opened_at >= PROBE_AFTER_S for g in st.gaps)

    def _merge(
        self, rows: list[DictRow], snap_xmin: int, probe_xid: int | None, now: float
    ) -> None:
        st = self._state
        late: list[DictRow] = []
        for row in rows:
            event_id = int(row["id"])
            if event_id > st.known:
                if event_id > st.known + 1:
                    st.gaps.append(_Gap(st.known + 1, event_id - 1, now))
                st.known = event_id
                st.pending[event_id] = row
                continue
            gap = self._take_from_gap(event_id)
            if gap is None:
                continue  # read before (a gap re-read overlapping nothing new)
            if gap.passed:
                logger.warning(
                    "audit event %d (run %s) committed %.1fs after its id was taken; "
                    "delivered late, out of id order",
                    event_id,
                    row["run_id"],
                    now - gap.opened_at,
                )
                late.append(row)
            else:
                st.pending[event_id] = row
        # Settle: every transaction in flight at an earlier read has ended, so its gap ids
        # that are still missing rolled back.
        while st.probes and snap_xmin > st.probes[0][0]:
            _, upto = st.probes.popleft()
            st.gaps = [g for g in st.gaps if g.lo > upto]
        if probe_xid is not None:
            st.probes.append((probe_xid, st.known))
        # A gap open for longer than stall_s stops holding events back.
        for g in st.gaps:
            if not g.passed and now - g.opened_at > self.stall_s:
                g.passed = True
                logger.warning(
                    "audit ids %d..%d still uncommitted after %.1fs; live events no longer "
                    "wait for them",
                    g.lo,
                    g.hi,
                    now - g.opened_at,
                )
        if not self.ready.is_set() and (
            (self._startup_xid is not None and snap_xmin > self._startup_xid)
            or now - self._started_at > self.stall_s
        ):
            self.ready.set()
        block = min((g.lo for g in st.gaps if not g.passed), default=st.known + 1)
        ready_ids = sorted(i for i in st.pending if i < block)
        out = [st.pending.pop(i) for i in ready_ids]
        before = st.frontier
        st.frontier = max(st.frontier, block - 1)
        self._offer(late, late=True)
        self._offer(out)
        if st.frontier != before or late:
            self._advanced.set()
            self._advanced = asyncio.Event()

    def _take_from_gap(self, event_id: int) -> _Gap | None:
        """Remove `event_id` from the gap holding it; returns that gap (None: no gap)."""
        gaps = self._state.gaps
        for i, g in enumerate(gaps):
            if g.lo <= event_id <= g.hi:
                pieces = []
                if g.lo < event_id:
                    pieces.append(_Gap(g.lo, event_id - 1, g.opened_at, g.passed))
                if event_id < g.hi:
                    pieces.append(_Gap(event_id + 1, g.hi, g.opened_at, g.passed))
                gaps[i : i + 1] = pieces
                return g
        return None

    def _offer(self, rows: list[DictRow], *, late: bool = False) -> None:
        """Hand `rows` (resolved, in id order; `late`: past the frontier already) to the
        streams watched now, each row made into a `LiveEvent` once, and only when some
        stream wants it."""
        if not rows:
            return
        self.delivered += len(rows)
        to_all = self._all.subscribers > 0
        if not to_all and not self._by_run:
            return
        events: list[LiveEvent] = []
        per_run: dict[str, list[LiveEvent]] = {}
        for row in rows:
            run_id = str(row["run_id"])
            watched = run_id in self._by_run
            if not (to_all or watched):
                continue
            event = LiveEvent.from_row(row, late=late)
            events.append(event)
            if watched:
                per_run.setdefault(run_id, []).append(event)
        if to_all:
            self._all.append(events)
        for run_id, mine in per_run.items():
            self._by_run[run_id].append(mine)
