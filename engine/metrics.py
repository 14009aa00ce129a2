"""Prometheus metrics: one `REGISTRY` per process, what the process does as counters and
histograms, and the queue + Postgres-health gauges the API reads at scrape time.

Names follow Prometheus conventions (prefix ``pgdag_``, base units seconds and bytes,
``_total`` on counters) and carry low-cardinality labels only: ``tool``, ``outcome``,
``status``, ``table``, ``state``, ``reason``; never a run or step id.
docs/operations.md ("Metrics") lists them with their meaning, the scrape cost and alert rules.

Two kinds live here:

- **Counters and histograms of work done** (`ATTEMPTS`, `RETRIES`, `DEAD_LETTERS`,
  `LEASE_EXPIRIES`, `FENCING_REFUSALS`, `CANCELLATIONS`, `READY_TO_START`,
  `ATTEMPT_DURATION`, and the live-event ones). Each process counts what *it* did: the API
  its reaper passes, the agent reports it records and the cancellations it makes; a
  database worker (``python -m workers --metrics-port``) its own attempts. Summing a
  counter over every process's ``/metrics`` gives the cluster's total. The ones counted per
  attempt are tallies (`TallyCounter`, `TallyHistogram`): plain ints that `TallyCollector`
  exports at scrape time, 0.8 µs an attempt instead of prometheus_client's 3.3 µs.
- **Gauges of state** (`QueueCollector`): read from Postgres when ``/metrics`` is scraped,
  by three statements of ``engine/sql/queries.sql`` (``metrics_queue``,
  ``metrics_pg_tables``, ``metrics_pg_activity``) that read partial indexes and statistics
  views, never all of ``steps``. A snapshot is kept `CACHE_S` (1 s), so two scrapes in a
  row (or two Prometheus servers) cost one round of queries. Only the API exports them:
  every process would read the same numbers.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from bisect import bisect_left
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING

import psycopg
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    disable_created_metrics,
    generate_latest,
    start_http_server,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString
from psycopg.rows import DictRow
from psycopg_pool import AsyncConnectionPool

from engine.sql import queries

if TYPE_CHECKING:
    from engine.transitions import ClaimedStep

logger = logging.getLogger(__name__)

Pool = AsyncConnectionPool[psycopg.AsyncConnection[DictRow]]

PREFIX = "pgdag_"
CACHE_S = 1.0  # a gauge snapshot is reused this long (seconds) by the next scrape
SCRAPE_TIMEOUT_S = 5.0  # the gauge queries' budget (seconds) before the scrape answers 503
CONTENT_TYPE = CONTENT_TYPE_LATEST  # text exposition format 0.0.4
HEALTH_TABLES: tuple[str, ...] = ("steps", "audit_log", "runs", "step_edges")
# Attempt outcomes (`ATTEMPTS`' ``outcome`` label): the attempt's result was recorded as a
# success or a failure, or it was not recorded because its lease was lost (a stale fencing
# token), or because the result was refused (an output Postgres cannot store).
OUTCOMES: tuple[str, ...] = ("succeeded", "failed", "lease_lost", "refused")

# Latency buckets (seconds): from a claim on a hot queue (ms) to a backlog of minutes.
LATENCY_BUCKETS_S: tuple[float, ...] = (
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0,
)  # fmt: skip
# Attempt durations (seconds): tools run from milliseconds to their timeout (minutes).
DURATION_BUCKETS_S: tuple[float, ...] = (
    0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0,
)  # fmt: skip
# LISTEN lag (seconds): normally milliseconds; seconds mean a long transaction or a backlog.
LAG_BUCKETS_S: tuple[float, ...] = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
)  # fmt: skip

# No ``*_created`` series beside every counter and histogram: they double the text for a
# timestamp Prometheus does not use (process-wide in prometheus_client, as is this module).
disable_created_metrics()  # type: ignore[no-untyped-call]  # untyped in prometheus_client

REGISTRY = CollectorRegistry(auto_describe=True)
"""This process's registry: everything below is registered in it, and `render` exports it.
(Not prometheus_client's global REGISTRY, whose process and platform collectors would mix
with ours and which a library should not fill.)"""

# --- work done: counters and histograms ---------------------------------------------------


class TallyCounter:
    """A counter family counted in plain ints, for the per-attempt hot path.

    prometheus_client's `Counter` takes a lock and checks its state on every ``inc`` (about
    0.8 µs); a worker counts several series per attempt, so the per-attempt families keep
    their numbers here (one dict update, about 0.1 µs) and `TallyCollector` turns them into
    ordinary counter families when ``/metrics`` is scraped. Only one thread updates a series
    (the process's event loop; ``pgdag_attempts{outcome="succeeded"}`` of a worker, only a
    fold of `ATTEMPT_DURATION`, under its lock, which may be a scrape's thread); a scrape
    from prometheus_client's server thread reads it as it is (a value may be one update
    behind, never torn). `name` has no ``_total`` (the
    exposition adds it); `labelnames` name the label values each `inc` gets, in order.
    """

    def __init__(self, name: str, documentation: str, labelnames: Sequence[str] = ()) -> None:
        self.name = name
        self.documentation = documentation
        self.labelnames = tuple(labelnames)
        self.values: dict[tuple[str, ...], float] = {}

    def inc(self, *labels: str, amount: float = 1) -> None:
        """Add `amount` (>= 0) to the series of `labels` (one value per label name)."""
        values = self.values
        values[labels] = values.get(labels, 0) + amount

    def value(self, *labels: str) -> float:
        """The series' count so far (0 for one never counted)."""
        return self.values.get(labels, 0)

    def family(self) -> CounterMetricFamily:
        """The family as a scrape shows it."""
        fam = CounterMetricFamily(self.name, self.documentation, labels=self.labelnames)
        for labels, value in list(self.values.items()):
            fam.add_metric(list(labels), value)
        return fam


class TallyHistogram:
    """A histogram family by one label (``tool``; None: no label, observe with label ``""``)
    kept in plain lists; see `TallyCounter`.

    An observation is one ``bisect`` and two additions. Buckets are `buckets` (upper
    bounds in seconds, ascending; ``+Inf`` is implied), each inclusive (``le``) as in the
    Prometheus exposition format; ``_count`` is the sum of the bucket counts, so a scrape
    never shows a count that its buckets disagree with.

    The hottest paths defer even that: they append to `pending` lists, which `fold` counts
    in (every scrape folds first). `on_fold(label, n)`, when given, is told how many
    deferred values of `label` a fold counted, under the same lock, before the scrape
    reads anything (`ATTEMPTS` counts deferred successes so). Since a scrape's thread may
    fold, every write to the series (`observe`, `fold`) holds that lock: uncontended, it
    costs about 0.1 us, and the deferred values do not take it one by one.
    """

    def __init__(
        self,
        name: str,
        documentation: str,
        labelname: str | None,
        buckets: Sequence[float],
        *,
        on_fold: Callable[[str, int], None] | None = None,
    ) -> None:
        self.name = name
        self.documentation = documentation
        self.labelname = labelname
        self.bounds = tuple(buckets)
        self.on_fold = on_fold
        # label value -> [counts per bucket (the last one: above every bound), sum]
        self.series: dict[str, tuple[list[int], list[float]]] = {}
        # label value -> values appended since the last fold (by the event loop's thread)
        self._pending: dict[str, list[float]] = {}
        self._fold_lock = threading.Lock()  # a scrape's thread and the loop's may both fold

    def pending(self, label: str) -> list[float]:
        """The list the hot path appends values of `label` to (seconds; negative ones count
        as 0), instead of calling `observe`: one ``list.append``, about 40 ns against 240.
        They are counted at the next `fold`."""
        values = self._pending.get(label)
        if values is None:
            values = self._pending.setdefault(label, [])
        return values

    def pending_count(self) -> int:
        """How many values wait for the next `fold`."""
        return sum(len(values) for values in list(self._pending.values()))

    def fold(self) -> None:
        """Count every pending value in its series (and tell `on_fold`). Safe from any
        thread while the event loop appends: only the values present when it looked are
        taken (``del values[:n]``), a value appended meanwhile waits for the next fold."""
        with self._fold_lock:
            for label, values in list(self._pending.items()):
                n = len(values)
                if not n:
                    continue
                taken = values[:n]
                del values[:n]
                for value in taken:
                    self._count(label, value)
                if self.on_fold is not None:
                    self.on_fold(label, n)

    def observe(self, label: str, value: float) -> None:
        """Count `value` (seconds; negative ones count as 0) in the series of `label`."""
        with self._fold_lock:
            self._count(label, value)

    def _count(self, label: str, value: float) -> None:
        """`observe` without the lock: its caller holds it."""
        series = self.series.get(label)
        if series is None:
            series = self.series[label] = ([0] * (len(self.bounds) + 1), [0.0])
        if value < 0:
            value = 0.0
        series[0][bisect_left(self.bounds, value)] += 1
        series[1][0] += value

    def count(self, label: str) -> int:
        """How many values the series of `label` has counted."""
        series = self.series.get(label)
        return sum(series[0]) if series is not None else 0

    def family(self) -> HistogramMetricFamily:
        """The family as a scrape shows it (cumulative buckets)."""
        labelnames = [self.labelname] if self.labelname is not None else []
        fam = HistogramMetricFamily(self.name, self.documentation, labels=labelnames)
        for label, (counts, total) in list(self.series.items()):
            counts = list(counts)
            buckets: list[tuple[str, float]] = []
            running = 0
            for bound, n in zip(self.bounds, counts, strict=False):
                running += n
                buckets.append((floatToGoString(bound), running))  # type: ignore[no-untyped-call]
            buckets.append(("+Inf", running + counts[-1]))
            fam.add_metric([label] if labelnames else [], buckets, sum_value=total[0])
        return fam


class TallyCollector(Collector):
    """Exports `TallyCounter` and `TallyHistogram` families at scrape time."""

    def __init__(self, tallies: Sequence[TallyCounter | TallyHistogram]) -> None:
        self.tallies = tuple(tallies)

    def collect(self) -> Iterator[CounterMetricFamily | HistogramMetricFamily]:
        for tally in self.tallies:  # every deferred value counted before anything is read
            if isinstance(tally, TallyHistogram):
                tally.fold()
        for tally in self.tallies:
            yield tally.family()

    def describe(self) -> Iterator[CounterMetricFamily | HistogramMetricFamily]:
        # Names only (no samples), so that registering checks them against the others.
        for tally in self.tallies:
            if isinstance(tally, TallyCounter):
                yield CounterMetricFamily(tally.name, tally.documentation, labels=tally.labelnames)
            else:
                labels = [tally.labelname] if tally.labelname is not None else []
                yield HistogramMetricFamily(tally.name, tally.documentation, labels=labels)


ATTEMPTS = TallyCounter(
    "pgdag_attempts",
    "Attempts whose result this process handled, by tool and outcome: succeeded or failed "
    "(recorded), lease_lost (refused: the fencing token was stale), refused (the output "
    "could not be stored; the attempt was failed instead).",
    ["tool", "outcome"],
)
RETRIES = TallyCounter(
    "pgdag_retries",
    "Failed attempts that sent their step back to ready for another attempt after a backoff.",
    ["tool"],
)
DEAD_LETTERS = TallyCounter(
    "pgdag_dead_letters",
    "Steps this process moved to dead_letter (attempts spent, an error not retryable, or "
    'the lease of an "idempotent": false step expired).',
    ["tool"],
)
LEASE_EXPIRIES = Counter(
    "pgdag_lease_expiries",
    "Running steps whose lease expired and that this process's reaper requeued or dead-lettered.",
    registry=REGISTRY,
)
FENCING_REFUSALS = TallyCounter(
    "pgdag_fencing_refusals",
    "Results or heartbeats refused because their fencing token was not the step's current "
    "one (a zombie attempt).",
    ["tool"],
)
CANCELLATIONS = Counter(
    "pgdag_cancellations",
    "Runs this process cancelled.",
    registry=REGISTRY,
)
READY_TO_START = TallyHistogram(
    "pgdag_ready_to_start_seconds",
    "Seconds from a step's ready time (availableAt) to its claim, on the database clock.",
    "tool",
    LATENCY_BUCKETS_S,
)
ATTEMPT_DURATION = TallyHistogram(
    "pgdag_attempt_duration_seconds",
    "Seconds from an attempt's claim to its result being recorded (or refused).",
    "tool",
    DURATION_BUCKETS_S,
    # Its pending values are successes only (`count_success`): each is also an attempt.
    on_fold=lambda tool, n: ATTEMPTS.inc(tool, "succeeded", amount=n),
)
# Pending values past this are folded at the next claim (`count_claims`), between scrapes.
FOLD_AT = 10_000
REGISTRY.register(
    TallyCollector(
        [ATTEMPTS, RETRIES, DEAD_LETTERS, FENCING_REFUSALS, READY_TO_START, ATTEMPT_DURATION]
    )
)

# --- maintenance (engine.maintenance) -------------------------------------------------------

MAINTENANCE_LEADER = Gauge(
    "pgdag_maintenance_leader",
    "1 while this process holds the maintenance lead (one process across the installation), "
    "else 0.",
    registry=REGISTRY,
)
MAINTENANCE_LAST_RUN = Gauge(
    "pgdag_maintenance_last_run_timestamp_seconds",
    "Start (Unix time) of the last run of each maintenance task in this process, by task: "
    "reaper, pruner, audit_partitions, liveness.",
    ["task"],
    registry=REGISTRY,
)
MAINTENANCE_LAST_DURATION = Gauge(
    "pgdag_maintenance_last_run_duration_seconds",
    "Seconds the last run of each maintenance task took in this process.",
    ["task"],
    registry=REGISTRY,
)
MAINTENANCE_LAST_SUCCESS = Gauge(
    "pgdag_maintenance_last_run_success",
    "1 when the last run of the task succeeded, 0 when it raised (see GET /maintenance).",
    ["task"],
    registry=REGISTRY,
)
MAINTENANCE_LAST_ROWS = Gauge(
    "pgdag_maintenance_last_run_rows",
    "What the last successful run of the task acted on: steps reaped, runs pruned, "
    "partitions and rows handled, silent workers.",
    ["task"],
    registry=REGISTRY,
)


def observe_maintenance_run(
    task: str, *, started_at_s: float, duration_s: float, rows: int | None
) -> None:
    """One run of maintenance task `task`: its start (Unix seconds), duration (seconds) and
    `rows` (None: it raised)."""
    MAINTENANCE_LAST_RUN.labels(task=task).set(started_at_s)
    MAINTENANCE_LAST_DURATION.labels(task=task).set(duration_s)
    MAINTENANCE_LAST_SUCCESS.labels(task=task).set(0 if rows is None else 1)
    if rows is not None:
        MAINTENANCE_LAST_ROWS.labels(task=task).set(rows)


# --- live events (engine.live, engine.ws) --------------------------------------------------

LISTEN_LAG = TallyHistogram(  # observed for every audit row the API reads: a tally
    "pgdag_live_listen_lag_seconds",
    "Seconds from an audit event's created_at (its transaction's start) to this process's "
    "LISTEN read of it, on the database clock.",
    None,
    LAG_BUCKETS_S,
)
REGISTRY.register(TallyCollector([LISTEN_LAG]))
WEBSOCKET_CLIENTS = Gauge(
    "pgdag_websocket_clients",
    "WebSocket clients (/ws and /ws/runs/{runId}) connected to this process.",
    registry=REGISTRY,
)
WEBSOCKET_RESYNCS = Counter(
    "pgdag_websocket_resyncs",
    "Resyncs sent to WebSocket clients, by reason: slow_client (it fell behind its queue) "
    "or replay_too_long (its ?after= asked for too many events).",
    ["reason"],
    registry=REGISTRY,
)


def count_claim(tool: str, ready_wait_s: float | None) -> None:
    """A claimed attempt of `tool`: its ready-to-start latency (`ready_wait_s` seconds on
    the database clock, `ClaimedStep.ready_wait_s`; None when not known) in `READY_TO_START`."""
    if ready_wait_s is not None:
        READY_TO_START.observe(tool, ready_wait_s)


def count_claims(steps: Sequence[ClaimedStep]) -> None:
    """`count_claim` for each step of one claim, deferred (`TallyHistogram.pending`): the
    worker's form, one call per claim. Folds the deferred values once they pass `FOLD_AT`,
    so that they stay few between scrapes (or without any)."""
    tool = None
    values: list[float] = []
    for step in steps:
        if step.ready_wait_s is None:
            continue
        if step.tool != tool:  # a claim's steps are mostly of one tool
            tool = step.tool
            values = READY_TO_START.pending(tool)
        values.append(step.ready_wait_s)
    if READY_TO_START.pending_count() > FOLD_AT:
        READY_TO_START.fold()
    if ATTEMPT_DURATION.pending_count() > FOLD_AT:
        ATTEMPT_DURATION.fold()


def count_success(tool: str, duration_s: float) -> None:
    """`count_result(tool, "succeeded", duration_s=duration_s)`, deferred: the worker's
    form for an attempt recorded as succeeded `duration_s` seconds after its claim. Both
    `ATTEMPTS` and `ATTEMPT_DURATION` show it after the next fold (a scrape folds first)."""
    ATTEMPT_DURATION.pending(tool).append(duration_s)


def fold() -> None:
    """Count every deferred value now (`TallyHistogram.fold`); a scrape does it itself."""
    READY_TO_START.fold()
    ATTEMPT_DURATION.fold()


def count_result(
    tool: str,
    outcome: str,
    *,
    duration_s: float | None = None,
    retried: bool = False,
    dead_letter: bool = False,
    fenced: bool = False,
) -> None:
    """An attempt of `tool` handled with `outcome` (one of `OUTCOMES`; raises `ValueError`
    for another): `ATTEMPTS`; `duration_s` (seconds from its claim, None: not observed) in
    `ATTEMPT_DURATION`; a ``lease_lost`` attempt, or any with `fenced` (an outcome refused
    because another worker holds the lease), is a fencing refusal (`FENCING_REFUSALS`);
    `retried` counts a retry (`RETRIES`), `dead_letter` a dead letter (`DEAD_LETTERS`)."""
    if outcome not in OUTCOMES:
        raise ValueError(f"outcome must be one of {', '.join(OUTCOMES)}, got {outcome!r}")
    ATTEMPTS.inc(tool, outcome)
    if duration_s is not None:
        ATTEMPT_DURATION.observe(tool, duration_s)
    if outcome == "lease_lost" or fenced:
        FENCING_REFUSALS.inc(tool)
    if retried:
        RETRIES.inc(tool)
    if dead_letter:
        DEAD_LETTERS.inc(tool)


def count_reaped(expired: Iterable[tuple[str, str]]) -> None:
    """One reaper pass of this process: `expired` is ``(tool, new_status)`` of each step
    whose lease expired (`engine.transitions.Reaped.expired`): each a `LEASE_EXPIRIES`, and
    a `DEAD_LETTERS` of its tool when it went to ``dead_letter``."""
    for tool, status in expired:
        LEASE_EXPIRIES.inc()
        if status == "dead_letter":
            DEAD_LETTERS.inc(tool)


def serve(port: int, host: str = "127.0.0.1") -> int:
    """Serve ``/metrics`` (this process's `REGISTRY`) over HTTP on `host`:`port` from a
    daemon thread (prometheus_client's `start_http_server`); what ``python -m workers
    --metrics-port`` runs. Returns the port bound (`port` 0: one the system chose). Raises
    `OSError` when the address cannot be bound (a port in use, a host not local)."""
    server, _thread = start_http_server(port, addr=host, registry=REGISTRY)
    bound: int = server.server_address[1]
    return bound


def render(registry: CollectorRegistry = REGISTRY) -> bytes:
    """The text exposition format (`CONTENT_TYPE`) of `registry`: what ``/metrics`` answers.
    Raises what a collector raises (`QueueCollector.collect` does not: it serves its last
    snapshot)."""
    return generate_latest(registry)


# --- throughput: completions by the minute (the dashboard's queue view) -------------------

THROUGHPUT_MINUTES = 10  # minutes of completions ``GET /queue`` returns


class MinuteCounts:
    """Events counted by the UTC minute they happened in (``unix seconds // 60``), the last
    `keep` minutes only (older minutes are dropped as newer ones come: memory is bounded).

    `COMPLETIONS` is the API's count of ``step_succeeded`` audit events, fed by its live
    listener (`engine.live.EventHub`), which reads every audit row exactly once: no query
    of its own (audit_log has no index on ``created_at`` to count from). It starts empty
    when the process starts."""

    def __init__(self, keep: int = THROUGHPUT_MINUTES) -> None:
        self.keep = keep
        self.counts: dict[int, int] = {}

    def add(self, at_s: float, n: int = 1) -> None:
        """Count `n` events at Unix time `at_s` (seconds); an event older than the kept
        minutes (a late commit read after them) is not counted."""
        minute = int(at_s // 60)
        newest = max(self.counts, default=minute)
        if minute <= newest - self.keep:
            return
        self.counts[minute] = self.counts.get(minute, 0) + n
        if minute > newest:
            for old in [m for m in self.counts if m <= minute - self.keep]:
                del self.counts[old]

    def last(self, now_s: float) -> list[tuple[int, int]]:
        """``(minute start in Unix seconds, count)`` of the `keep` minutes up to the one of
        Unix time `now_s`, oldest first; the last one is the current, partial minute."""
        current = int(now_s // 60)
        minutes = range(current - self.keep + 1, current + 1)
        return [(m * 60, self.counts.get(m, 0)) for m in minutes]


COMPLETIONS = MinuteCounts()


# --- state: gauges read at scrape time -----------------------------------------------------


@dataclass
class Snapshot:
    """One round of the gauge queries; `read_at` is `time.monotonic` seconds."""

    read_at: float
    ready: dict[str, float] = field(default_factory=dict)
    oldest_ready_s: dict[str, float] = field(default_factory=dict)
    running: dict[str, float] = field(default_factory=dict)
    dead_letter: dict[str, float] = field(default_factory=dict)
    runs: dict[str, float] = field(default_factory=dict)
    workers: dict[str, float] = field(default_factory=dict)
    tables: list[DictRow] = field(default_factory=list)
    connections: dict[str, float] = field(default_factory=dict)
    oldest_xact_s: float = 0.0


class QueueCollector(Collector):
    """The gauges of queue state and Postgres health, read from Postgres through `pool`.

    prometheus_client calls `collect` synchronously, so the API's ``/metrics`` route first
    awaits `refresh` (three statements on one pooled connection, at most once per
    `cache_s` seconds however many scrapes come) and `collect` then yields that snapshot.
    `tools` are tool names always exported (0 when idle), so that a series does not vanish
    when its queue empties; tools seen in the tables or on live workers are added.
    `lease_ttl_s` is the heartbeat age (seconds) within which a worker counts as live.
    """

    def __init__(
        self,
        pool: Pool,
        *,
        lease_ttl_s: float,
        tools: Iterable[str] = (),
        cache_s: float = CACHE_S,
        tables: Sequence[str] = HEALTH_TABLES,
    ) -> None:
        self.pool = pool
        self.lease_ttl_s = lease_ttl_s
        self.tools = frozenset(tools)
        self.cache_s = cache_s
        self.tables = tuple(tables)
        self.snapshot: Snapshot | None = None
        self.rounds = 0  # rounds of queries run (a test checks the cache with it)
        self._lock = asyncio.Lock()

    async def refresh(self) -> Snapshot:
        """The snapshot, read again unless the last one is younger than `cache_s` seconds;
        concurrent callers share one read. Raises `psycopg.Error` (or `PoolTimeout`) when
        Postgres does not answer: the route answers 503 then."""
        async with self._lock:
            snap = self.snapshot
            if snap is not None and time.monotonic() - snap.read_at < self.cache_s:
                return snap
            snap = await self._read()
            self.snapshot = snap
            self.rounds += 1
            return snap

    async def _read(self) -> Snapshot:
        snap = Snapshot(read_at=time.monotonic())
        async with self.pool.connection(timeout=SCRAPE_TIMEOUT_S) as conn:
            cur = await conn.execute(queries["metrics_queue"], {"lease_ttl_s": self.lease_ttl_s})
            for row in await cur.fetchall():
                kind, key, n = row["kind"], row["key"], float(row["n"])
                if kind == "ready":
                    snap.ready[key] = n
                    if row["oldest_s"] is not None:
                        snap.oldest_ready_s[key] = max(0.0, float(row["oldest_s"]))
                elif kind == "running":
                    snap.running[key] = n
                elif kind == "dead_letter":
                    snap.dead_letter[key] = n
                elif kind == "runs":
                    snap.runs[key] = n
                else:
                    snap.workers[key] = n
            cur = await conn.execute(queries["metrics_pg_tables"], {"tables": list(self.tables)})
            snap.tables = await cur.fetchall()
            cur = await conn.execute(queries["metrics_pg_activity"])
            for row in await cur.fetchall():
                snap.connections[row["state"]] = float(row["n"])
                snap.oldest_xact_s = max(snap.oldest_xact_s, float(row["oldest_xact_s"]))
        return snap

    def describe(self) -> Iterator[GaugeMetricFamily]:
        """No families up front: the registry must not run `collect` (nor need a snapshot)
        when the collector is registered."""
        return iter(())

    def tools_of(self, snap: Snapshot) -> list[str]:
        """The tools `snap` is exported for, sorted: `tools` and every tool it saw."""
        return sorted(
            self.tools
            | snap.ready.keys()
            | snap.running.keys()
            | snap.dead_letter.keys()
            | snap.workers.keys()
        )

    def queue_json(self, snap: Snapshot, *, now_s: float) -> dict[str, object]:
        """``GET /queue``'s body: `snap`'s gauges by tool (the numbers ``/metrics`` exports),
        the unfinished runs, `COMPLETIONS` of the last `THROUGHPUT_MINUTES` minutes up to
        Unix time `now_s` (seconds), and the snapshot's age in seconds."""
        return {
            "tools": [
                {
                    "tool": tool,
                    "ready": int(snap.ready.get(tool, 0)),
                    "running": int(snap.running.get(tool, 0)),
                    "oldestReadyAgeSeconds": snap.oldest_ready_s.get(tool, 0.0),
                    "deadLetter": int(snap.dead_letter.get(tool, 0)),
                    "workersLive": int(snap.workers.get(tool, 0)),
                }
                for tool in self.tools_of(snap)
            ],
            "runs": {s: int(snap.runs.get(s, 0)) for s in ("pending", "running")},
            "completionsPerMinute": [
                {
                    "minute": datetime.fromtimestamp(start, UTC).isoformat(),
                    "succeeded": n,
                }
                for start, n in COMPLETIONS.last(now_s)
            ],
            "snapshotAgeSeconds": max(0.0, time.monotonic() - snap.read_at),
        }

    def collect(self) -> Iterator[GaugeMetricFamily]:
        """The gauges of the last snapshot (none before the first `refresh`)."""
        snap = self.snapshot
        if snap is None:
            return
        tools = self.tools_of(snap)

        def by_tool(name: str, doc: str, values: dict[str, float]) -> GaugeMetricFamily:
            family = GaugeMetricFamily(name, doc, labels=["tool"])
            for tool in tools:
                family.add_metric([tool], values.get(tool, 0.0))
            return family

        yield by_tool(
            "pgdag_steps_ready",
            "Ready steps by tool, including those waiting out a backoff (steps_ready_idx).",
            snap.ready,
        )
        yield by_tool(
            "pgdag_oldest_ready_age_seconds",
            "Age in seconds of the oldest ready step whose availableAt has come, by tool "
            "(0: none waiting).",
            snap.oldest_ready_s,
        )
        yield by_tool(
            "pgdag_steps_running", "Running steps by tool (steps_lease_idx).", snap.running
        )
        yield by_tool(
            "pgdag_steps_dead_letter",
            "Steps in dead_letter by tool (steps_dead_letter_idx).",
            snap.dead_letter,
        )
        yield by_tool(
            "pgdag_workers_live",
            "Live workers and agents (heartbeat within the lease TTL) that have the tool.",
            snap.workers,
        )
        runs = GaugeMetricFamily(
            "pgdag_runs", "Unfinished runs by status (runs_status_seq_idx).", labels=["status"]
        )
        for status in ("pending", "running"):
            runs.add_metric([status], snap.runs.get(status, 0.0))
        yield runs
        yield from self._health(snap)

    def _health(self, snap: Snapshot) -> Iterator[GaugeMetricFamily]:
        dead = GaugeMetricFamily(
            "pgdag_pg_table_dead_tuples",
            "Dead tuples of the table (pg_stat_user_tables, an estimate).",
            labels=["table"],
        )
        live = GaugeMetricFamily(
            "pgdag_pg_table_live_tuples",
            "Live tuples of the table (pg_stat_user_tables, an estimate).",
            labels=["table"],
        )
        size = GaugeMetricFamily(
            "pgdag_pg_table_size_bytes",
            "Bytes on disk of the table with its indexes and TOAST (pg_total_relation_size).",
            labels=["table"],
        )
        vacuumed = GaugeMetricFamily(
            "pgdag_pg_last_autovacuum_timestamp_seconds",
            "Unix time of the table's last autovacuum (absent: never vacuumed by autovacuum).",
            labels=["table"],
        )
        for row in snap.tables:
            name = row["table_name"]
            dead.add_metric([name], row["dead_tuples"])
            live.add_metric([name], row["live_tuples"])
            size.add_metric([name], row["size_bytes"])
            if row["last_autovacuum_s"] is not None:
                vacuumed.add_metric([name], row["last_autovacuum_s"])
        yield from (dead, live, size, vacuumed)
        yield GaugeMetricFamily(
            "pgdag_pg_oldest_transaction_age_seconds",
            "Age in seconds of the oldest open transaction of another client backend (0: none).",
            value=snap.oldest_xact_s,
        )
        connections = GaugeMetricFamily(
            "pgdag_pg_connections",
            "Client connections to the Postgres cluster by state (pg_stat_activity).",
            labels=["state"],
        )
        for state, n in sorted(snap.connections.items()):
            connections.add_metric([state], n)
        yield connections
