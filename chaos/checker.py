"""The chaos invariant checker: judge a whole history from the audit log, never from timing.

Like Jepsen's queue checker, it reads everything that happened (the ``audit_log`` rows, with
the final ``runs`` and ``steps`` rows) and reports every broken invariant, each as a
`Violation` whose detail names the event ids and fencing tokens involved. `check_rows` is
pure, for hand-made histories; `check_database` loads a consistent snapshot and calls it.
`ledger_duplicates` compares the requests a side-effect ledger received with the recorded
successes.

Violation kinds:

``overlapping_leases``
    A step_claimed while the step's previous claim has not ended. Every claim must be
    followed by exactly one ending event carrying its lease_token (step_succeeded,
    step_retry_scheduled, step_dead_lettered, step_lease_expired, step_released,
    step_map_expanded or step_cancelled) before the next claim; an ending event with no open
    claim, a second ending of one claim, an ending event carrying another token, or a reset
    (step_retried, step_unskipped, step_replayed) while a claim is open is reported too.
``stale_token_success``
    A step_succeeded whose lease_token is not the token of the step's latest step_claimed.
``dependency_not_met``
    A step_claimed its trigger rule (``run_if``) did not allow. ``all_succeeded`` (the
    default): every ``depends_on`` is succeeded at the claim (its last event with a smaller
    id is a step_succeeded). ``all_done``: every one had ended (terminal) when the step was
    last decided ready; ``any_failed``: the same, with at least one of them not succeeded
    (dead_letter, skipped or cancelled). The decision is the step's latest event to
    ``ready`` before the claim other than a requeue (step_retry_scheduled,
    step_lease_expired, step_released) or a manual retry of the step itself (step_retried,
    which forces it ready): a manual retry of a dependency does not take back a dependent
    already decided. A decision written by a reset (step_replayed, step_retried,
    step_unskipped) is judged after the whole reset statement. A map step's claims: the
    first (ended by step_map_expanded) is judged by its rule over its ``depends_on``; its
    join (a claim after the expansion) needs every child of that expansion succeeded.
``terminal_changed``
    Any event for a step after it reached cancelled; after succeeded only step_replayed is
    allowed, after dead_letter step_retried or step_replayed, after skipped step_unskipped
    or step_replayed.
``run_status_mismatch``
    A run's status disagrees with its steps (completed with a step unfinished, in dead_letter
    or cancelled; failed with a step unfinished or none in dead_letter; cancelled with a step
    still pending, ready or running; pending or running with every step terminal) or with
    its last run event; or a step's status disagrees with the to_status of its last event.
``success_count``
    A succeeded step without exactly one step_succeeded since its last step_retried or
    step_replayed (each reopens the step: a new success is expected after it).
``non_idempotent_rerun``
    An ``"idempotent": false`` step claimed more than once between manual retries
    (step_retried) or replays (step_replayed). This is the strict at-most-once reading: a
    re-claim after the step's own retryable failure counts too. A map step runs no tool of
    its own (its claims expand it and join its children), so it is not counted.
``stuck_pending``
    A step still pending although its trigger rule has decided it: every dependency has
    ended (or, for ``all_succeeded``, one ended without succeeding), so nothing will ever
    make it ready or skip it, and its run can never finish. An expanded map step waits for
    its children as ``all_succeeded``. A pending step with nothing to wait for is stuck too,
    unless its run has a start time (``start_at``) or the step has a ``delay_ms``: it is
    parked, and the maintenance leader promotes it when its time comes.
``delay_not_met``
    A step with a ``delay_ms`` (``"delayMs"``) claimed without having slept: the decision
    before the claim (see ``dependency_not_met``) must be the promotion of its sleep, a
    step_ready with reason ``delay``, or the step must have been forced ready by a manual
    retry (step_retried, which runs a dead letter at once). A map step's join is not judged
    (it sleeps once, before it expands). And such a step_ready must not come before the
    ``until`` its park said (the step_delayed, or a reset's detail), by the audit rows' own
    times (the database clock).
    (The decisions happen in the statements that end each dependency, so no consistent
    snapshot shows this legitimately.)
``added_steps``
    Steps a run added to itself (issue 15 part 5) broke all-or-none or fencing: a
    steps_added event (on the step that added them, with its lease_token) that is not
    followed, as that step's next event, by its step_succeeded under the same token (the
    two are written by one transaction); a step it names that does not exist (some were
    lost); a step named by two steps_added events; or a step of the run that is neither one
    of the steps submitted with it (the first ``steps`` of ``run_created``'s detail, by id),
    a map child, nor named by a steps_added (it came from nowhere).
``wait_broken``
    A wait step (``wait_signal``, migration 0010) claimed by a worker or made ready (it is
    only ever completed by a signal, step_signalled, or timed out); a step_signalled of a
    step that waits for no signal; a timeout (step_wait_timed_out, or step_dead_lettered
    with reason ``timeout``) of a step that waits for none, or before the deadline its park
    said (the ``until`` of its step_delayed, step_wait_timed_out or reset). A step_signalled
    opens an attempt like a claim (its fencing token must end it: see
    ``overlapping_leases``) and is judged like one by ``dependency_not_met`` (an
    ``all_succeeded`` wait step; the others were judged when they parked).
``child_run_mismatch``
    A step of kind run (tool ``$run``, ``"run": {template}``) and its child runs disagree.
    Each claim of such a step (by the maintenance leader) names its child in its detail
    (``childRunId``), unless it ends at once refused (step_dead_lettered); no two claims
    name one child; every child run in the history whose parent step is in it too is named
    by exactly one claim of that step (a second child for one attempt is reported, as is a
    child nobody claimed); an attempt with a child ends (step_succeeded, step_retry_scheduled,
    step_dead_lettered) only after its child's run ended, and step_succeeded only when the
    child completed (a completed child may still fail the step: outputs too large to store);
    a cancelled parent run leaves no child pending or running.

Ordering by audit_log id is the real order for one step (all its events are written under
its row lock). Across steps it is sound for dependencies: a dependent can be claimed only
after the statement that recorded its parent's end committed, so that end has the smaller
id; and a statement that ends a step and decides its dependents writes the end first.

Rows may describe steps the engine has since deleted (a replay drops a map step's old
children with their audit rows); a step with events but no row is reported, never a crash.
"""

from __future__ import annotations

import bisect
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Final, LiteralString

import psycopg
from psycopg.pq import TransactionStatus
from psycopg.rows import dict_row

from engine.transitions import TERMINAL_STEP_STATES

# The checker keeps its own copy of the state machine's vocabulary instead of importing the
# engine's: a checker that shares the code it judges would share its mistakes. The engine
# always sets to_status; these are the fallbacks for hand-made rows without one.
STEP_EVENT_STATUS: Final[Mapping[str, str]] = {
    "step_claimed": "running",
    "step_succeeded": "succeeded",
    "step_retry_scheduled": "ready",
    "step_dead_lettered": "dead_letter",
    "step_lease_expired": "ready",
    "step_released": "ready",
    "step_ready": "ready",
    "step_skipped": "skipped",
    "step_cancelled": "cancelled",
    "step_retried": "ready",
    "step_unskipped": "pending",
    "step_map_expanded": "pending",
    "step_replayed": "pending",
    "step_delayed": "pending",
    "steps_added": "running",
    "step_signalled": "running",
    "step_wait_timed_out": "pending",
}
RUN_EVENT_STATUS: Final[Mapping[str, str]] = {
    "run_created": "pending",
    "run_started": "running",
    "run_completed": "completed",
    "run_failed": "failed",
    "run_cancelled": "cancelled",
    "run_resumed": "running",
    "run_replayed": "running",
}
UNFINISHED_STEP_STATES: Final = frozenset({"pending", "ready", "running"})
# Trigger rules (steps.run_if), as engine/rules.py describes them.
RUN_IF_RULES: Final = ("all_succeeded", "all_done", "any_failed")
DEFAULT_RUN_IF: Final = "all_succeeded"
# Events that end an attempt (a claim). step_cancelled ends one only when a claim is open
# (or it says it left ``running``); cancelling a pending or ready step ends no attempt.
LEASE_ENDING_EVENTS: Final = frozenset(
    {
        "step_succeeded",
        "step_retry_scheduled",
        "step_dead_lettered",
        "step_lease_expired",
        "step_released",
        "step_map_expanded",
        "step_cancelled",
    }
)
# Events that send an attempt back to ready: not a new decision of the trigger rule.
REQUEUE_EVENTS: Final = frozenset({"step_retry_scheduled", "step_lease_expired", "step_released"})
# Resets by a person (manual retry, replay): one statement writes each batch of them.
RESET_EVENTS: Final = frozenset({"step_retried", "step_unskipped", "step_replayed"})
# The events allowed after each terminal state.
ALLOWED_AFTER_TERMINAL: Final[Mapping[str, frozenset[str]]] = {
    "succeeded": frozenset({"step_replayed"}),
    "cancelled": frozenset(),
    "dead_letter": frozenset({"step_retried", "step_replayed"}),
    "skipped": frozenset({"step_unskipped", "step_replayed"}),
}
# detail.reason of a step_dead_lettered written because the lease ended, not by a failure.
LEASE_ENDED_REASONS: Final = frozenset({"lease expired", "worker shutdown"})
# How many step names a run-level violation lists before "and N more".
LISTED_STEPS_MAX: Final = 10

KINDS: Final = (
    "overlapping_leases",
    "stale_token_success",
    "dependency_not_met",
    "terminal_changed",
    "run_status_mismatch",
    "success_count",
    "non_idempotent_rerun",
    "stuck_pending",
    "delay_not_met",
    "added_steps",
    "wait_broken",
    "child_run_mismatch",
)
CHILD_RUN_TOOL: Final = "$run"  # engine.dag.CHILD_RUN_TOOL
CHILD_ENDS: Final = frozenset({"step_succeeded", "step_retry_scheduled", "step_dead_lettered"})

# Read-only diagnostics, not engine queries: kept here rather than in engine/sql, which
# holds what the engine runs. NULL ids means every run.
_SELECT_RUNS: Final[LiteralString] = """
SELECT id, status, start_at, parent_run_id, parent_step_id FROM runs
WHERE %(ids)s::uuid[] IS NULL OR id = ANY(%(ids)s::uuid[])
   OR parent_run_id = ANY(%(ids)s::uuid[])
ORDER BY seq
"""
_SELECT_STEPS: Final[LiteralString] = """
SELECT id, run_id, name, status, idempotent, depends_on, run_if,
       map_path IS NOT NULL AS is_map, map_width, map_parent_id, map_index, delay_ms, tool,
       wait_signal
FROM steps
WHERE %(ids)s::uuid[] IS NULL OR run_id = ANY(%(ids)s::uuid[])
ORDER BY id
"""
_SELECT_EVENTS: Final[LiteralString] = """
SELECT id, run_id, step_id, step_name, event, from_status, to_status, attempt, lease_token,
       worker_id, detail, created_at
FROM audit_log
WHERE %(ids)s::uuid[] IS NULL OR run_id = ANY(%(ids)s::uuid[])
ORDER BY id
"""

Row = dict[str, Any]
StepKey = tuple[str, str]  # (run_id, step name)
_Add = Callable[[str, str], None]  # add(kind, detail) for one step


@dataclass(frozen=True)
class Violation:
    """One broken invariant: its `kind` (see the module docstring), the run, the step name
    (None for a run-level violation) and a detail naming the event ids and tokens."""

    kind: str
    run_id: str
    step: str | None
    detail: str


@dataclass
class Report:
    """What the checker found in a history: the violations and what happened, counted."""

    violations: list[Violation] = field(default_factory=list)
    runs: int = 0
    steps: int = 0
    attempts: int = 0
    """step_claimed events."""
    retries: int = 0
    """step_retry_scheduled events (a failed attempt sent back after a backoff)."""
    leases_expired: int = 0
    """step_lease_expired events (the reaper requeued an attempt)."""
    dead_letters: int = 0
    """step_dead_lettered events, whatever their cause."""
    released: int = 0
    """step_released events (a worker's graceful shutdown handed the attempt back)."""
    reruns_after_unrecorded_success: int = 0
    """Left 0 by the checker; the caller fills it from `ledger_duplicates`."""
    non_idempotent_for_review: int = 0
    """``"idempotent": false`` steps now in dead_letter because their lease ended (the
    reaper or a shutdown release), not because of their own failure."""

    @property
    def ok(self) -> bool:
        """True when no violation was found."""
        return not self.violations


def check_rows(runs: list[Row], steps: list[Row], events: list[Row]) -> Report:
    """Check a history given as rows (dicts keyed by column name); pure, no I/O.

    `runs` need ``id`` and ``status`` and may carry ``start_at`` (default none); `steps` need
    ``run_id``, ``name``, ``status`` and may carry ``id``, ``idempotent`` (default true),
    ``depends_on`` (default none), ``run_if`` (default ``all_succeeded``), ``is_map``
    (default false), ``map_width``, ``map_parent_id`` / ``map_index`` (a map child: the
    id of its map step), ``delay_ms``, ``wait_signal`` (default none) and ``tool``
    (``$run``: a step of kind run, whose children are the `runs` with its ``parent_step_id``
    and ``parent_run_id``); `events` are audit_log rows and need ``id``, ``run_id`` and
    ``event``, with ``step_name`` (or a ``step_id`` found in `steps`) for step events. A
    missing ``to_status`` is taken from the event name. Ids may be UUIDs or strings.
    """
    h = _History(steps, events)
    report = Report(runs=len(runs), steps=len(steps))
    out = report.violations
    for key in sorted(h.step_rows.keys() | h.step_events.keys()):
        _check_step(key, h, out)
    delayed = {str(r["id"]) for r in runs if r.get("start_at") is not None}
    for key, row in sorted(h.step_rows.items()):
        _check_stuck(key, row, h, key[0] in delayed, out)

    steps_by_run: dict[str, list[Row]] = defaultdict(list)
    for (run_id, _), s in h.step_rows.items():
        steps_by_run[run_id].append(s)
    for run in runs:
        run_id = str(run["id"])
        _check_run(run_id, str(run["status"]), steps_by_run[run_id], h.run_events[run_id], out)
    _check_added(h, steps_by_run, out)
    _check_child_runs(runs, h, out)

    counts = Counter(str(e["event"]) for e in events)
    report.attempts = counts["step_claimed"]
    report.retries = counts["step_retry_scheduled"]
    report.leases_expired = counts["step_lease_expired"]
    report.dead_letters = counts["step_dead_lettered"]
    report.released = counts["step_released"]
    report.non_idempotent_for_review = sum(
        1
        for key, s in h.step_rows.items()
        if s["status"] == "dead_letter"
        and not s.get("idempotent", True)
        and _last_dead_letter_was_lease_end(h.step_events.get(key, []))
    )
    return report


def check_database(conn: psycopg.Connection[Any], run_ids: list[str] | None = None) -> Report:
    """Load the runs `run_ids` (None: every run) and their child runs, with their steps and
    audit log, from `conn` and check them with `check_rows`.

    The three reads share one snapshot (REPEATABLE READ, READ ONLY) when `conn` is idle, so
    a live engine cannot make them disagree; inside a caller's transaction they run in that
    transaction. Works whatever the connection's row factory; leaves no transaction open
    that it started. Raises `psycopg.Error` on a database error.
    """
    ids = None if run_ids is None else [str(i) for i in run_ids]
    idle = conn.info.transaction_status == TransactionStatus.IDLE
    with conn.transaction():
        cur = conn.cursor(row_factory=dict_row)
        if idle:
            cur.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
        runs = cur.execute(_SELECT_RUNS, {"ids": ids}).fetchall()
        if ids is not None:  # with the child runs of the runs named (steps of kind run)
            ids = [str(r["id"]) for r in runs]
        steps = cur.execute(_SELECT_STEPS, {"ids": ids}).fetchall()
        events = cur.execute(_SELECT_EVENTS, {"ids": ids}).fetchall()
    return check_rows(runs, steps, events)


def ledger_duplicates(
    requests: list[tuple[str, datetime]], succeeded_at: dict[str, datetime]
) -> tuple[int, int]:
    """Compare a side-effect ledger with the recorded successes.

    `requests` are ``(idempotency_key, arrival time)`` as the ledger recorded them;
    `succeeded_at` maps ``"<runId>:<stepName>"`` to the created_at of its step_succeeded.
    Returns ``(duplicates, at_least_once_reruns)``: duplicates are requests for a key that
    arrived after its success was recorded (must be 0); at_least_once_reruns are the extra
    requests (beyond the first) that arrived before it, or for a key with no success yet,
    which at-least-once execution allows (a crash between the effect and the record).
    Requests without a key cannot be attributed to a step and are not counted. Times must
    be comparable (both timezone-aware).
    """
    duplicates = 0
    before: Counter[str] = Counter()
    for key, arrived_at in requests:
        if not key:
            continue
        recorded_at = succeeded_at.get(key)
        if recorded_at is not None and arrived_at > recorded_at:
            duplicates += 1
        else:
            before[key] += 1
    return duplicates, sum(n - 1 for n in before.values())


# --- child runs ----------------------------------------------------------------------------


def _check_child_runs(runs: list[Row], h: _History, out: list[Violation]) -> None:
    """``child_run_mismatch``: steps of kind run against their child runs (see the module
    docstring)."""
    by_id = {str(r["id"]): r for r in runs}
    step_key_by_id = {
        int(s["id"]): key for key, s in h.step_rows.items() if s.get("id") is not None
    }
    named: dict[str, list[tuple[StepKey, Row]]] = defaultdict(list)  # child id -> claims
    for key, row in h.step_rows.items():
        if row.get("tool") != CHILD_RUN_TOOL:
            continue
        run_id, name = key

        def add(detail: str, run_id: str = run_id, name: str = name) -> None:
            out.append(Violation("child_run_mismatch", run_id, name, detail))

        evs = h.step_events.get(key, [])
        for i, e in enumerate(evs):
            if e["event"] != "step_claimed":
                continue
            detail = e.get("detail")
            child = detail.get("childRunId") if isinstance(detail, Mapping) else None
            end = next(
                (x for x in evs[i + 1 :] if x.get("lease_token") == e.get("lease_token")), None
            )
            if child is None:
                if end is None or end["event"] != "step_dead_lettered":
                    add(f"{_ev(e)} names no child run and was not refused at once")
                continue
            child = str(child)
            named[child].append((key, e))
            crow = by_id.get(child)
            if crow is None or end is None or end["event"] not in CHILD_ENDS:
                continue  # child not in the history, or the attempt not ended by its outcome
            done = [
                x
                for x in h.run_events.get(child, [])
                if x["event"] in ("run_completed", "run_failed", "run_cancelled")
            ]
            if not done or int(done[-1]["id"]) > int(end["id"]):
                add(f"{_ev(end)} ended the attempt of child run {child} before the child ended")
            elif end["event"] == "step_succeeded" and done[-1]["event"] != "run_completed":
                add(f"{_ev(end)} after child run {child} ended with {_ev(done[-1])}")
    for child, claims in named.items():
        if len(claims) > 1:
            run_id, name = claims[0][0]
            ids = ", ".join(_ev(e) for _, e in claims)
            out.append(
                Violation("child_run_mismatch", run_id, name, f"child run {child} named by {ids}")
            )
    for r in runs:
        parent_step = r.get("parent_step_id")
        if parent_step is None:
            continue
        pkey = step_key_by_id.get(int(parent_step))
        child = str(r["id"])
        if pkey is not None and child not in named:
            out.append(
                Violation(
                    "child_run_mismatch",
                    pkey[0],
                    pkey[1],
                    f"child run {child} was named by no claim",
                )
            )
        parent = by_id.get(str(r.get("parent_run_id")))
        if (
            parent is not None
            and parent["status"] == "cancelled"
            and r["status"] in ("pending", "running")
        ):
            out.append(
                Violation(
                    "child_run_mismatch",
                    str(parent["id"]),
                    None if pkey is None else pkey[1],
                    f"run cancelled, its child run {child} still {r['status']}",
                )
            )


# --- the history, indexed ----------------------------------------------------------------


class _History:
    """The rows of a history indexed for the checks: each step's row and events (by id),
    each run's events, map children, and each step's status at any event id."""

    def __init__(self, steps: list[Row], events: list[Row]) -> None:
        self.step_rows: dict[StepKey, Row] = {}
        key_by_step_id: dict[int, StepKey] = {}
        for s in steps:
            key = (str(s["run_id"]), str(s["name"]))
            self.step_rows[key] = s
            if s.get("id") is not None:
                key_by_step_id[int(s["id"])] = key
        children: dict[StepKey, list[tuple[int, StepKey]]] = defaultdict(list)
        for key, s in self.step_rows.items():
            parent = s.get("map_parent_id")
            if parent is not None and int(parent) in key_by_step_id:
                index = s.get("map_index")
                children[key_by_step_id[int(parent)]].append(
                    (-1 if index is None else int(index), key)
                )
        self.children: dict[StepKey, list[StepKey]] = {
            k: [c for _, c in sorted(v)] for k, v in children.items()
        }

        self.step_events: dict[StepKey, list[Row]] = defaultdict(list)
        self.run_events: dict[str, list[Row]] = defaultdict(list)  # run-level events only
        self._run_seq: dict[str, list[Row]] = defaultdict(list)  # every event of the run
        for e in sorted(events, key=lambda e: int(e["id"])):
            owner = _step_key(e, key_by_step_id)
            self._run_seq[str(e["run_id"])].append(e)
            if owner is None:
                if e["event"] in RUN_EVENT_STATUS or e.get("to_status") is not None:
                    self.run_events[str(e["run_id"])].append(e)
                # (else a run event that changes no status: signal_received)
            else:
                self.step_events[owner].append(e)
        self._ids = {k: [int(e["id"]) for e in evs] for k, evs in self.step_events.items()}
        self._run_ids = {r: [int(e["id"]) for e in evs] for r, evs in self._run_seq.items()}
        self.successes: dict[StepKey, list[int]] = {
            key: [int(e["id"]) for e in evs if e["event"] == "step_succeeded"]
            for key, evs in self.step_events.items()
        }

    def knows(self, key: StepKey) -> bool:
        return key in self.step_rows or key in self.step_events

    def last_before(self, key: StepKey, event_id: float) -> Row | None:
        """The step's last event with an id smaller than `event_id`, if any."""
        ids = self._ids.get(key, [])
        i = bisect.bisect_left(ids, event_id)
        return self.step_events[key][i - 1] if i else None

    def status_at(self, key: StepKey, event_id: float) -> str | None:
        """The status the step's events had left it in just before `event_id`; None before
        its first event (created pending or ready: unfinished either way)."""
        last = self.last_before(key, event_id)
        return None if last is None else _to_status(last)

    def after_reset(self, e: Row) -> float:
        """The id just past the reset statement that wrote `e`: the run's next event that is
        not a reset (a reset statement writes its rows in no particular order)."""
        run_id = str(e["run_id"])
        ids, seq = self._run_ids.get(run_id, []), self._run_seq.get(run_id, [])
        i = bisect.bisect_right(ids, int(e["id"]))
        while i < len(seq) and seq[i]["event"] in RESET_EVENTS:
            i += 1
        return ids[i] if i < len(seq) else float("inf")


# --- one step --------------------------------------------------------------------------------


@dataclass
class _Window:
    """Attempts of a step since its creation or its last reset (step_retried, step_replayed)."""

    since: Row | None = None  # the reset that opened it; None: creation
    claims: list[Row] = field(default_factory=list)
    successes: list[Row] = field(default_factory=list)
    ends: dict[int, Row] = field(default_factory=dict)  # claim event id -> its ending event

    def describe(self) -> str:
        return "creation" if self.since is None else _ev(self.since)


def _check_step(key: StepKey, h: _History, out: list[Violation]) -> None:
    run_id, name = key
    row = h.step_rows.get(key)
    evs = h.step_events.get(key, [])

    def add(kind: str, detail: str) -> None:
        out.append(Violation(kind, run_id, name, detail))

    idempotent = True if row is None else bool(row.get("idempotent", True))
    rule = DEFAULT_RUN_IF if row is None else str(row.get("run_if") or DEFAULT_RUN_IF)
    depends_on = [] if row is None else [str(d) for d in row.get("depends_on") or ()]
    expansions = [int(e["id"]) for e in evs if e["event"] == "step_map_expanded"]
    is_map = bool(expansions) or (row is not None and bool(row.get("is_map", False)))
    last_claim: Row | None = None
    claim_open = False
    window = _Window()
    terminal: Row | None = None  # the event that left the step in a terminal state
    decision: Row | None = None  # the event that last decided the step ready
    expansion: Row | None = None  # the step_map_expanded the step now waits on, if any
    delay_ms = 0 if row is None else int(row.get("delay_ms") or 0)
    waits = row is not None and row.get("wait_signal") is not None
    park_until: datetime | None = None  # when the step's latest park said it wakes
    forced = False  # made ready by a manual retry since it last waited

    def end_claim(e: Row) -> None:
        nonlocal claim_open
        if last_claim is None:
            add("overlapping_leases", f"{_ev(e)} ends an attempt, but the step was never claimed")
        elif not claim_open:
            first = window.ends.get(int(last_claim["id"]))
            ended = f"; it already ended with {_ev(first)}" if first else ""
            add(
                "overlapping_leases",
                f"{_ev(e)} ends {_ev(last_claim)} a second time{ended}",
            )
        elif e.get("lease_token") != last_claim.get("lease_token"):
            add(
                "overlapping_leases",
                f"{_ev(e)} carries token {e.get('lease_token')}, but the open attempt is "
                f"{_ev(last_claim)}",
            )
            claim_open = False  # the write did end it, under the wrong token: report once
        else:
            claim_open = False
            window.ends[int(last_claim["id"])] = e

    for e in evs:
        event = str(e["event"])
        if terminal is not None:
            status = _to_status(terminal)
            allowed = ALLOWED_AFTER_TERMINAL.get(status, frozenset())
            if event not in allowed:
                only = " or ".join(sorted(allowed))
                also = f"; only {only} may follow {status}" if allowed else ""
                add(
                    "terminal_changed",
                    f"{_ev(e)} after {_ev(terminal)} left the step {status}{also}",
                )

        if waits and (event == "step_claimed" or (event == "step_ready")):
            add("wait_broken", f"{_ev(e)} of a wait step: no worker may run it, it is never ready")
        if event == "step_signalled" and not waits:
            add("wait_broken", f"{_ev(e)} of a step that waits for no signal")
        if event in ("step_wait_timed_out", "step_dead_lettered") and _is_timeout(e):
            at = e.get("created_at")
            if not waits:
                add("wait_broken", f"{_ev(e)} timed out a step that waits for no signal")
            elif park_until is not None and isinstance(at, datetime) and at < park_until:
                add(
                    "wait_broken",
                    f"{_ev(e)} timed the wait out at {at.isoformat()}, before its deadline "
                    f"{park_until.isoformat()}",
                )

        if event in ("step_claimed", "step_signalled"):
            if last_claim is not None and claim_open:
                add(
                    "overlapping_leases",
                    f"{_ev(e)} while {_ev(last_claim)} had not ended (no ending event with "
                    f"token {last_claim.get('lease_token')})",
                )
            if is_map and expansion is not None:
                if int(expansion["id"]) == expansions[-1]:  # older children were deleted
                    _check_join(e, expansion, h.children.get(key, []), h, add)
            elif event == "step_signalled":
                if rule == DEFAULT_RUN_IF:  # (all_done / any_failed: judged at the park)
                    _check_dependencies(e, key, depends_on, rule, decision, h, add)
            else:
                _check_dependencies(e, key, depends_on, rule, decision, h, add)
                if delay_ms and not forced and not _is_wake(decision):
                    woke = _ev(decision) if decision is not None else "none"
                    add(
                        "delay_not_met",
                        f"{_ev(e)} of a step with delayMs {delay_ms} that never slept: its "
                        f"decision to ready is {woke}, not a step_ready with reason delay",
                    )
            last_claim, claim_open = e, True
            window.claims.append(e)
        elif event == "step_succeeded":
            window.successes.append(e)
            if last_claim is None or e.get("lease_token") != last_claim.get("lease_token"):
                latest = "no step_claimed before it" if last_claim is None else _ev(last_claim)
                add(
                    "stale_token_success",
                    f"{_ev(e)} carries token {e.get('lease_token')}, but the step's latest "
                    f"claim is {latest}",
                )
            else:
                end_claim(e)
        elif (
            event in LEASE_ENDING_EVENTS
            and not _is_timeout(e)
            and (event != "step_cancelled" or claim_open or e.get("from_status") == "running")
        ):
            end_claim(e)
        elif event in RESET_EVENTS and claim_open and last_claim is not None:
            add(
                "overlapping_leases",
                f"{_ev(e)} reset the step while {_ev(last_claim)} had not ended",
            )
            claim_open = False

        if event == "step_map_expanded":
            expansion = e
        elif event == "step_retried" or (
            event == "step_replayed" and not _replay_keeps_expansion(e, name)
        ):
            expansion = None  # expands again (plan_reset's unexpand)
        if event in ("step_retried", "step_replayed"):
            _check_rerun(window, idempotent or is_map, add)
            window = _Window(since=e)
        to_status = _to_status(e)
        if _is_wake(e) and park_until is not None:
            at = e.get("created_at")
            if isinstance(at, datetime) and at < park_until:
                add(
                    "delay_not_met",
                    f"{_ev(e)} woke the step at {at.isoformat()}, before {park_until.isoformat()}"
                    " its park said",
                )
        if to_status == "ready" and event not in REQUEUE_EVENTS and event != "step_retried":
            decision = e
        elif to_status in ("pending", "skipped"):
            decision = None
            forced = False
            park_until = _park_until(e) if to_status == "pending" else None
        if event == "step_retried":
            forced = True
        terminal = e if to_status in TERMINAL_STEP_STATES else None

    _check_rerun(window, idempotent or is_map, add)
    if row is not None and row["status"] == "succeeded" and len(window.successes) != 1:
        found = ", ".join(_ev(s) for s in window.successes) or "none"
        add(
            "success_count",
            f"the step is succeeded with {len(window.successes)} step_succeeded since "
            f"{window.describe()} (want exactly 1): {found}",
        )
    if evs:
        last = evs[-1]
        if row is None:
            add(
                "run_status_mismatch",
                f"the audit log has events for a step the steps table lacks (last: {_ev(last)})",
            )
        elif _to_status(last) != row["status"]:
            add(
                "run_status_mismatch",
                f"the steps table says {row['status']}, but its last event {_ev(last)} left "
                f"it {_to_status(last)}",
            )


def _is_timeout(e: Row) -> bool:
    """Whether `e` is a wait step's timeout (detail reason ``timeout``)."""
    detail = e.get("detail")
    return isinstance(detail, Mapping) and detail.get("reason") == "timeout"


def _is_wake(e: Row | None) -> bool:
    """Whether `e` is the promotion of a parked step's sleep (step_ready, reason delay)."""
    if e is None or e["event"] != "step_ready":
        return False
    detail = e.get("detail")
    return isinstance(detail, Mapping) and detail.get("reason") == "delay"


def _park_until(e: Row) -> datetime | None:
    """The wake time a park wrote in its detail (``until``: step_delayed, or a reset of a
    step with a delay), or None."""
    detail = e.get("detail")
    until = detail.get("until") if isinstance(detail, Mapping) else None
    if isinstance(until, datetime):
        return until
    if isinstance(until, str):
        try:
            return datetime.fromisoformat(until)
        except ValueError:
            return None
    return None


def _replay_keeps_expansion(e: Row, name: str) -> bool:
    """A replay keeps a map step's expansion only when it started at one of its children."""
    detail = e.get("detail")
    start = detail.get("from") if isinstance(detail, Mapping) else None
    return isinstance(start, str) and start.startswith(f"{name}[") and start.endswith("]")


def _check_dependencies(
    claim: Row,
    key: StepKey,
    depends_on: list[str],
    rule: str,
    decision: Row | None,
    h: _History,
    add: _Add,
) -> None:
    run_id = key[0]
    claim_id = int(claim["id"])
    deps = []
    for dep in depends_on:
        if h.knows((run_id, dep)):
            deps.append(dep)
        else:
            add("dependency_not_met", f"{_ev(claim)}: dependency {dep!r} is not a step of the run")
    if rule not in ("all_done", "any_failed"):
        for dep in deps:
            status = h.status_at((run_id, dep), claim_id)
            if status == "succeeded":
                continue
            ids = h.successes.get((run_id, dep), [])
            if bisect.bisect_left(ids, claim_id) == 0:  # no success with a smaller id
                later = (
                    f"; its first step_succeeded is #{ids[0]}" if ids else "; it never succeeded"
                )
                add(
                    "dependency_not_met",
                    f"{_ev(claim)} before any step_succeeded of dependency {dep!r}{later}",
                )
            else:
                last = h.last_before((run_id, dep), claim_id)
                add(
                    "dependency_not_met",
                    f"{_ev(claim)} while dependency {dep!r} was {status} (after "
                    f"{_ev(last) if last else 'its creation'})",
                )
        return

    # all_done / any_failed: judged when the step was decided ready.
    if decision is None:
        at, when = float(claim_id), _ev(claim)
    elif decision["event"] in RESET_EVENTS:
        at, when = h.after_reset(decision), f"{_ev(decision)} (after its reset)"
    else:
        at, when = float(int(decision["id"])), _ev(decision)
    statuses = {dep: h.status_at((run_id, dep), at) for dep in deps}
    for dep, status in statuses.items():
        if status not in TERMINAL_STEP_STATES:
            add(
                "dependency_not_met",
                f"{_ev(claim)} (runIf {rule}, decided by {when}) while dependency {dep!r} "
                f"had not ended ({status or 'not started'})",
            )
    if rule == "any_failed" and statuses and all(s == "succeeded" for s in statuses.values()):
        add(
            "dependency_not_met",
            f"{_ev(claim)} (runIf any_failed, decided by {when}) though every dependency "
            f"had succeeded: {', '.join(repr(d) for d in statuses)}",
        )


def _check_join(
    claim: Row, expansion: Row, children: list[StepKey], h: _History, add: _Add
) -> None:
    claim_id = int(claim["id"])
    for child in children:
        status = h.status_at(child, claim_id)
        if status != "succeeded":
            add(
                "dependency_not_met",
                f"{_ev(claim)} joins the map step expanded by {_ev(expansion)} while its "
                f"child {child[1]!r} was {status or 'not started'}",
            )


def _check_rerun(window: _Window, idempotent: bool, add: _Add) -> None:
    if idempotent or len(window.claims) <= 1:
        return
    attempts = []
    for c in window.claims:
        end = window.ends.get(int(c["id"]))
        attempts.append(f"{_ev(c)} ended by {_ev(end)}" if end else f"{_ev(c)} not ended")
    add(
        "non_idempotent_rerun",
        f'an "idempotent": false step claimed {len(window.claims)} times since '
        f"{window.describe()}: " + "; ".join(attempts),
    )


def _decide(rule: str, *, remaining: int, failed: int) -> str:
    """The checker's own statement of the trigger rules (see the module docstring):
    ``pending``, ``ready`` or ``skipped``. An unknown rule is read as all_succeeded."""
    if rule not in ("all_done", "any_failed") and failed > 0:
        return "skipped"
    if remaining > 0:
        return "pending"
    if rule == "any_failed" and failed == 0:
        return "skipped"
    return "ready"


def _check_stuck(key: StepKey, row: Row, h: _History, delayed: bool, out: list[Violation]) -> None:
    if row["status"] != "pending":
        return
    run_id, name = key
    children = h.children.get(key, [])
    if row.get("map_width") is not None or children:  # an expanded map step
        rule, deps, what = "all_succeeded", children, "child"
    else:
        rule = str(row.get("run_if") or DEFAULT_RUN_IF)
        deps = [(run_id, str(d)) for d in row.get("depends_on") or ()]
        what = "dependency"
    if not deps and delayed:
        return  # a delayed root: promote_due_steps wakes it when the run's start time comes
    parents = [h.step_rows.get(d) for d in deps]
    if any(p is None for p in parents):
        return  # cannot judge what is not there
    statuses = [str(p["status"]) for p in parents if p is not None]
    remaining = sum(1 for s in statuses if s in UNFINISHED_STEP_STATES)
    failed = sum(1 for s in statuses if s not in UNFINISHED_STEP_STATES and s != "succeeded")
    verdict = _decide(rule, remaining=remaining, failed=failed)
    if verdict == "pending":
        return
    if verdict == "ready" and row.get("delay_ms") and row.get("map_width") is None:
        return  # parked: promote_due_steps wakes it when its sleep is over (a wait step: a
        # signal completes it, or time_out_wait_steps fails it at its deadline)
    done = ", ".join(
        f"{d[1]!r} {s} (step_succeeded #{h.successes[d][-1]})"
        if s == "succeeded" and h.successes.get(d)
        else f"{d[1]!r} {s}"
        for d, s in zip(deps, statuses, strict=True)
    )
    out.append(
        Violation(
            "stuck_pending",
            run_id,
            name,
            f"the step is pending, but by runIf {rule} it should be {verdict}: "
            f"{what} statuses " + (done or f"none (no {what})") + "; nothing will decide it",
        )
    )


# --- one run ---------------------------------------------------------------------------------


def _check_run(
    run_id: str, status: str, steps: list[Row], evs: list[Row], out: list[Violation]
) -> None:
    def add(detail: str) -> None:
        out.append(Violation("run_status_mismatch", run_id, None, detail))

    def having(states: Iterable[str]) -> list[Row]:
        wanted = frozenset(states)
        return [s for s in steps if s["status"] in wanted]

    if status == "completed":
        # skipped steps (skipped by a trigger rule) do not fail a run
        if bad := [s for s in steps if s["status"] not in ("succeeded", "skipped")]:
            add(f"run is completed, but steps are neither succeeded nor skipped: {_names(bad)}")
    elif status == "failed":
        if bad := having(UNFINISHED_STEP_STATES):
            add(f"run is failed, but steps are unfinished: {_names(bad)}")
        if not having({"dead_letter"}):
            add("run is failed, but no step is in dead_letter")
    elif status == "cancelled":
        if bad := having(UNFINISHED_STEP_STATES):
            add(f"run is cancelled, but steps are still unfinished: {_names(bad)}")
    elif (
        status in ("pending", "running")
        and steps
        and len(having(TERMINAL_STEP_STATES)) == len(steps)
    ):
        add(f"run is {status}, but every step is terminal: {_names(steps)}")
    if evs and (left := _to_status(evs[-1])) != status:
        add(f"runs table says {status}, but its last run event {_ev(evs[-1])} left it {left}")


def _check_added(h: _History, steps_by_run: Mapping[str, list[Row]], out: list[Violation]) -> None:
    """The ``added_steps`` invariants (see the module docstring)."""
    named_by: dict[StepKey, int] = {}
    for key, evs in sorted(h.step_events.items()):
        for i, e in enumerate(evs):
            if e["event"] != "steps_added":
                continue
            run_id = key[0]
            nxt = evs[i + 1] if i + 1 < len(evs) else None
            if (
                nxt is None
                or nxt["event"] != "step_succeeded"
                or nxt.get("lease_token") != e.get("lease_token")
            ):
                out.append(
                    Violation(
                        "added_steps",
                        run_id,
                        key[1],
                        f"{_ev(e)} is not followed by the "
                        f"step's success under that token (next: {_ev(nxt) if nxt else 'none'})",
                    )
                )
            detail = e.get("detail") or {}
            for name in detail.get("steps") or []:
                added = (run_id, str(name))
                if added not in h.step_rows:
                    out.append(
                        Violation(
                            "added_steps",
                            run_id,
                            str(name),
                            f"named by {_ev(e)} of {key[1]!r}, but the run has no such step",
                        )
                    )
                if added in named_by:
                    out.append(
                        Violation(
                            "added_steps",
                            run_id,
                            str(name),
                            f"added twice: by event #{named_by[added]} and {_ev(e)}",
                        )
                    )
                named_by[added] = int(e["id"])
    for run_id, evs in h.run_events.items():
        created = next((e for e in evs if e["event"] == "run_created"), None)
        submitted = ((created or {}).get("detail") or {}).get("steps")
        rows = [r for r in steps_by_run.get(run_id, []) if r.get("id") is not None]
        if not isinstance(submitted, int) or not rows:
            continue  # a hand-made history without them: nothing to compare
        rows.sort(key=lambda r: int(r["id"]))
        for r in rows[submitted:]:
            key = (run_id, str(r["name"]))
            if r.get("map_parent_id") is None and key not in named_by:
                out.append(
                    Violation(
                        "added_steps",
                        run_id,
                        key[1],
                        "the step was neither submitted with the run nor added by a "
                        "steps_added event",
                    )
                )


# --- helpers ---------------------------------------------------------------------------------


def _step_key(e: Row, key_by_step_id: Mapping[int, StepKey]) -> StepKey | None:
    """The step an event belongs to, or None for a run-level event."""
    run_id = str(e["run_id"])
    if e.get("step_name") is not None:
        return run_id, str(e["step_name"])
    if e.get("step_id") is not None:
        return key_by_step_id.get(int(e["step_id"]), (run_id, f"<step id {e['step_id']}>"))
    return None


def _to_status(e: Row) -> str:
    """The status an event left its step or run in: its to_status, else from its name."""
    if e.get("to_status") is not None:
        return str(e["to_status"])
    event = str(e["event"])
    return STEP_EVENT_STATUS.get(event) or RUN_EVENT_STATUS.get(event) or "?"


def _ev(e: Row) -> str:
    """``step_claimed #12 (token 7)``: how details name an event."""
    token = e.get("lease_token")
    return f"{e['event']} #{e['id']}" + (f" (token {token})" if token is not None else "")


def _names(steps: list[Row]) -> str:
    shown = ", ".join(f"{s['name']} ({s['status']})" for s in steps[:LISTED_STEPS_MAX])
    more = len(steps) - LISTED_STEPS_MAX
    return shown + (f" and {more} more" if more > 0 else "")


def _last_dead_letter_was_lease_end(evs: list[Row]) -> bool:
    for e in reversed(evs):
        if e["event"] == "step_dead_lettered":
            detail = e.get("detail")
            return isinstance(detail, Mapping) and detail.get("reason") in LEASE_ENDED_REASONS
    return False
