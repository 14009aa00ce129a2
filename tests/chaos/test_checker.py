"""The chaos invariant checker: a clean hand-made history passes with the right counts, each
kind of violation is caught in a hand-made bad history (and nothing else is reported), a run
driven by the engine in-process checks clean until its rows are corrupted by hand, and the
side-effect ledger comparison counts duplicates and at-least-once re-sends."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import pytest
from psycopg.pq import TransactionStatus

from chaos.checker import (
    KINDS,
    RUN_EVENT_STATUS,
    STEP_EVENT_STATUS,
    Report,
    check_database,
    check_rows,
    ledger_duplicates,
)
from tests.support import query, submit

R1 = "11111111-1111-1111-1111-111111111111"


class History:
    """A hand-made audit log. Statuses follow the events the way the engine writes them, so
    a test states only the events; it may then overwrite a status to corrupt the rows."""

    def __init__(self) -> None:
        self.runs: dict[str, dict[str, Any]] = {}
        self.steps: dict[tuple[str, str], dict[str, Any]] = {}
        self.events: list[dict[str, Any]] = []
        self._token = 100
        self._step_id = 0
        self._event_id = 0

    def new_run(
        self,
        deps: dict[str, list[str]],
        *,
        run: str = R1,
        not_idempotent: tuple[str, ...] = (),
        run_if: dict[str, str] | None = None,
        maps: tuple[str, ...] = (),
        start_at: datetime | None = None,
    ) -> None:
        """A new run. Rows carry ``run_if`` / ``is_map`` / ``start_at`` only when given, so
        the checker's defaults for rows without them are exercised too."""
        self.runs[run] = {"id": run, "status": None}
        if start_at is not None:
            self.runs[run]["start_at"] = start_at
        for name, d in deps.items():
            self._step_id += 1
            row = {
                "id": self._step_id,
                "run_id": run,
                "name": name,
                "status": "pending" if d or start_at is not None else "ready",
                "idempotent": name not in not_idempotent,
                "depends_on": d,
            }
            if run_if and name in run_if:
                row["run_if"] = run_if[name]
            if name in maps:
                row.update(is_map=True, map_width=None)
            self.steps[(run, name)] = row
        self.run_event("run_created", run=run)

    def run_event(self, event: str, *, run: str = R1, to: str | None = None) -> int:
        row = self.runs[run]
        to = to or RUN_EVENT_STATUS[event]
        return self._append(run, None, event, row["status"], to, row)

    def ev(
        self,
        step: str,
        event: str,
        token: int | None = None,
        *,
        run: str = R1,
        to: str | None = None,
        **detail: Any,
    ) -> int:
        """Append a step event (to_status `to`, else the usual one); returns its id."""
        row = self.steps[(run, step)]
        to = to or STEP_EVENT_STATUS[event]
        return self._append(run, step, event, row["status"], to, row, token, detail or None)

    def expand(self, step: str, token: int, width: int, *, run: str = R1) -> list[str]:
        """step_map_expanded of a claimed map step into `width` ready children (created
        without an event, as the engine does); returns their names."""
        row = self.steps[(run, step)]
        names = [f"{step}[{i}]" for i in range(width)]
        for i, name in enumerate(names):
            self._step_id += 1
            self.steps[(run, name)] = {
                "id": self._step_id,
                "run_id": run,
                "name": name,
                "status": "ready",
                "idempotent": row["idempotent"],
                "depends_on": [],
                "map_parent_id": row["id"],
                "map_index": i,
            }
        row["map_width"] = width
        self.ev(step, "step_map_expanded", token, run=run, to="pending" if width else "ready")
        return names

    def replay(
        self, start: str, statuses: dict[str, str], *, run: str = R1, unexpand: tuple[str, ...] = ()
    ) -> None:
        """A replay from `start`: the children of the map steps `unexpand` are deleted with
        their audit rows, each step of `statuses` gets a step_replayed to its new status,
        then run_replayed."""
        for m in unexpand:
            parent = self.steps[(run, m)]
            parent["map_width"] = None
            gone = {k for k, s in self.steps.items() if s.get("map_parent_id") == parent["id"]}
            for k in gone:
                del self.steps[k]
            self.events = [e for e in self.events if (e["run_id"], e["step_name"]) not in gone]
        for name, status in statuses.items():
            self.ev(name, "step_replayed", run=run, to=status, reason="replay", **{"from": start})
        self.run_event("run_replayed", run=run)

    def succeed(self, *steps: str, run: str = R1) -> None:
        """Claim and complete each step in turn."""
        for step in steps:
            t = self.claim(step, run=run)
            self.ev(step, "step_succeeded", t, run=run)

    def claim(self, step: str, *, run: str = R1) -> int:
        """step_claimed with a new token (and run_started for a pending run); returns it."""
        if self.runs[run]["status"] == "pending":
            self.run_event("run_started", run=run)
        self._token += 1
        self.ev(step, "step_claimed", self._token, run=run)
        return self._token

    def check(self) -> Report:
        return check_rows(list(self.runs.values()), list(self.steps.values()), self.events)

    def _append(
        self,
        run: str,
        step: str | None,
        event: str,
        from_status: str | None,
        to_status: str,
        row: dict[str, Any],
        token: int | None = None,
        detail: dict[str, Any] | None = None,
    ) -> int:
        self._event_id += 1
        event_id = self._event_id
        self.events.append(
            {
                "id": event_id,
                "run_id": run,
                "step_id": None if step is None else row["id"],
                "step_name": step,
                "event": event,
                "from_status": from_status,
                "to_status": to_status,
                "lease_token": token,
                "detail": detail,
            }
        )
        row["status"] = to_status
        return event_id


def kinds(report: Report) -> set[str]:
    return {v.kind for v in report.violations}


def explain(report: Report) -> str:
    return "\n".join(f"{v.kind} {v.step}: {v.detail}" for v in report.violations)


# --- clean histories ---------------------------------------------------------------------------


def diamond() -> History:
    """a -> (b, c) -> d: a fails twice and is retried; b's lease expires and it is claimed
    again; c ("idempotent": false) dead-letters, d is skipped, the run fails, a person retries
    c, d is unskipped and the run resumes; d's worker shuts down and releases it once."""
    h = History()
    h.new_run({"a": [], "b": ["a"], "c": ["a"], "d": ["b", "c"]}, not_idempotent=("c",))
    for _ in range(2):
        t = h.claim("a")
        h.ev("a", "step_retry_scheduled", t, error="transient", retryable=True)
    t = h.claim("a")
    h.ev("a", "step_succeeded", t)
    h.ev("b", "step_ready")
    h.ev("c", "step_ready")
    t = h.claim("b")
    h.ev("b", "step_lease_expired", t, reason="lease expired")
    t = h.claim("b")
    h.ev("b", "step_succeeded", t)
    t = h.claim("c")
    h.ev("c", "step_dead_lettered", t, error="refused", retryable=False)
    h.ev("d", "step_skipped")
    h.run_event("run_failed")
    h.ev("c", "step_retried", reason="manual retry")
    h.ev("d", "step_unskipped")
    h.run_event("run_resumed")
    t = h.claim("c")
    h.ev("c", "step_succeeded", t)
    h.ev("d", "step_ready")
    t = h.claim("d")
    h.ev("d", "step_released", t, reason="worker shutdown")
    t = h.claim("d")
    h.ev("d", "step_succeeded", t)
    h.run_event("run_completed")
    return h


def test_clean_diamond_has_no_violation_and_counts_right() -> None:
    h = diamond()
    assert h.runs[R1]["status"] == "completed"
    report = h.check()
    assert report.ok, explain(report)
    assert (report.runs, report.steps) == (1, 4)
    assert report.attempts == 9
    assert report.retries == 2
    assert report.leases_expired == 1
    assert report.dead_letters == 1
    assert report.released == 1
    assert report.non_idempotent_for_review == 0  # c failed on its own and was retried
    assert report.reruns_after_unrecorded_success == 0


def test_event_order_comes_from_ids_not_from_the_list() -> None:
    h = diamond()
    random.Random(4).shuffle(h.events)
    report = h.check()
    assert report.ok, explain(report)


def test_clean_cancelled_failed_and_running_runs() -> None:
    h = diamond()
    r2, r3 = "22222222-2222-2222-2222-222222222222", "33333333-3333-3333-3333-333333333333"
    h.new_run({"p": [], "q": ["p"]}, run=r2)
    t = h.claim("p", run=r2)
    h.ev("p", "step_cancelled", t, run=r2, reason="by request")
    h.ev("q", "step_cancelled", run=r2, reason="by request")
    h.run_event("run_cancelled", run=r2)
    h.new_run({"x": [], "y": []}, run=r3, not_idempotent=("x", "y"))
    tx, ty = h.claim("x", run=r3), h.claim("y", run=r3)
    h.ev("x", "step_dead_lettered", tx, run=r3, reason="lease expired")  # the reaper
    h.ev("y", "step_dead_lettered", ty, run=r3, error="HTTP 400", retryable=False)  # own failure
    h.run_event("run_failed", run=r3)
    r4 = "44444444-4444-4444-4444-444444444444"  # still going: n waits on the running m
    h.new_run({"m": [], "n": ["m"]}, run=r4)
    h.claim("m", run=r4)
    report = h.check()
    assert report.ok, explain(report)
    assert (report.runs, report.steps, report.attempts, report.dead_letters) == (4, 10, 13, 3)
    assert report.non_idempotent_for_review == 1  # x only: its lease ended, it did not fail


# --- one bad history per kind -----------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    kind: str
    build: Callable[[], History]


def one_step(*, not_idempotent: bool = False) -> History:
    h = History()
    h.new_run({"a": []}, not_idempotent=("a",) if not_idempotent else ())
    return h


def claimed_twice() -> History:
    h = one_step()
    h.claim("a")
    t2 = h.claim("a")
    h.ev("a", "step_succeeded", t2)
    h.run_event("run_completed")
    return h


def ended_with_another_token() -> History:
    h = one_step()
    t1 = h.claim("a")
    h.ev("a", "step_retry_scheduled", t1 + 50)
    t2 = h.claim("a")
    h.ev("a", "step_succeeded", t2)
    h.run_event("run_completed")
    return h


def ended_twice() -> History:
    h = one_step()
    t1 = h.claim("a")
    h.ev("a", "step_lease_expired", t1)
    h.ev("a", "step_retry_scheduled", t1)  # the zombie's failure after the reaper's requeue
    t2 = h.claim("a")
    h.ev("a", "step_succeeded", t2)
    h.run_event("run_completed")
    return h


def zombie_success() -> History:
    h = one_step()
    t1 = h.claim("a")
    h.ev("a", "step_lease_expired", t1)
    h.claim("a")
    h.ev("a", "step_succeeded", t1)
    h.run_event("run_completed")
    return h


def success_without_claim() -> History:
    h = one_step()
    h.ev("a", "step_succeeded", 7)
    h.run_event("run_completed")
    return h


def claimed_before_parent_succeeded() -> History:
    h = History()
    h.new_run({"a": [], "b": ["a"]})
    ta = h.claim("a")
    tb = h.claim("b")
    h.ev("a", "step_succeeded", ta)
    h.ev("b", "step_succeeded", tb)
    h.run_event("run_completed")
    return h


def claimed_below_dead_parent() -> History:
    h = History()
    h.new_run({"a": [], "b": ["a"]})
    ta = h.claim("a")
    h.ev("a", "step_dead_lettered", ta, error="boom")
    tb = h.claim("b")
    h.ev("b", "step_succeeded", tb)
    h.run_event("run_failed")
    return h


def claimed_after_success() -> History:
    h = one_step()
    t = h.claim("a")
    h.ev("a", "step_succeeded", t)
    h.claim("a")
    return h


def claimed_after_dead_letter() -> History:
    h = one_step()
    t = h.claim("a")
    h.ev("a", "step_dead_lettered", t, error="boom")
    h.claim("a")
    return h


def ready_after_skipped() -> History:
    h = History()
    h.new_run({"a": [], "b": ["a"]})
    t = h.claim("a")
    h.ev("a", "step_dead_lettered", t, error="boom")
    h.ev("b", "step_skipped")
    h.ev("b", "step_ready")
    return h


def succeeded(h: History) -> History:
    t = h.claim("a")
    h.ev("a", "step_succeeded", t)
    return h


def completed_with_dead_letter() -> History:
    h = one_step()
    t = h.claim("a")
    h.ev("a", "step_dead_lettered", t, error="boom")
    h.run_event("run_completed")
    return h


def step_status_not_its_last_event() -> History:
    h = History()
    h.new_run({"a": [], "b": []})
    h.claim("a")
    h.steps[(R1, "a")]["status"] = "ready"  # the audit log says running
    return h


def failed_with_unfinished_step() -> History:
    h = History()
    h.new_run({"a": [], "b": []})
    ta = h.claim("a")
    h.claim("b")
    h.ev("a", "step_dead_lettered", ta, error="boom")
    h.run_event("run_failed")  # b is still running
    return h


def running_with_every_step_terminal() -> History:
    return succeeded(one_step())


def failed_without_dead_letter() -> History:
    h = succeeded(one_step())
    h.run_event("run_failed")
    return h


def cancelled_with_running_step() -> History:
    h = one_step()
    h.claim("a")
    h.run_event("run_cancelled")
    return h


def run_status_not_its_last_event() -> History:
    h = one_step()
    h.claim("a")  # run_started: the run is running
    h.runs[R1]["status"] = "pending"
    return h


def succeeded_without_recorded_success() -> History:
    h = History()
    h.new_run({"a": [], "b": []})
    t = h.claim("a")
    h.ev("a", "step_succeeded", t)
    h.steps[(R1, "b")]["status"] = "succeeded"  # no event at all for b
    h.run_event("run_completed")
    return h


def pending_after_parents_succeeded() -> History:
    """The shape of a lost promotion: b was skipped while a was still running, a succeeded
    (no promotion: b was not pending), then c's manual retry unskipped b and c succeeded."""
    h = History()
    h.new_run({"a": [], "c": [], "b": ["a", "c"]})
    ta, tc = h.claim("a"), h.claim("c")
    h.ev("c", "step_dead_lettered", tc, error="boom", retryable=False)
    h.ev("b", "step_skipped")
    h.ev("a", "step_succeeded", ta)
    h.run_event("run_failed")
    h.ev("c", "step_retried")
    h.ev("b", "step_unskipped")
    h.run_event("run_resumed")
    tc = h.claim("c")
    h.ev("c", "step_succeeded", tc)  # b should have become ready here
    return h


def non_idempotent_reclaimed_after(ending: str, **detail: Any) -> Callable[[], History]:
    def build() -> History:
        h = one_step(not_idempotent=True)
        t1 = h.claim("a")
        h.ev("a", ending, t1, **detail)
        t2 = h.claim("a")
        h.ev("a", "step_succeeded", t2)
        h.run_event("run_completed")
        return h

    return build


def any_failed_claimed_though_all_succeeded() -> History:
    h = History()
    h.new_run({"a": [], "on_fail": ["a"]}, run_if={"on_fail": "any_failed"})
    h.succeed("a")
    h.ev("on_fail", "step_ready")  # the rule says skipped
    h.succeed("on_fail")
    h.run_event("run_completed")
    return h


def all_done_claimed_before_its_dependency_ended() -> History:
    h = History()
    h.new_run({"a": [], "cleanup": ["a"]}, run_if={"cleanup": "all_done"})
    ta = h.claim("a")
    h.ev("cleanup", "step_ready")  # a is still running
    h.succeed("cleanup")
    h.ev("a", "step_succeeded", ta)
    h.run_event("run_completed")
    return h


def map_joined_before_a_child_succeeded() -> History:
    h = History()
    h.new_run({"list": [], "m": ["list"]}, maps=("m",))
    h.succeed("list")
    h.ev("m", "step_ready")
    m0, m1 = h.expand("m", h.claim("m"), 2)
    h.succeed(m0)
    h.ev("m", "step_ready")  # m[1] has not even started
    t = h.claim("m")
    h.succeed(m1)
    h.ev("m", "step_succeeded", t)
    h.run_event("run_completed")
    return h


def map_rejoined_before_its_replayed_child_succeeded() -> History:
    h = History()
    h.new_run({"m": []}, maps=("m",))
    children = h.expand("m", h.claim("m"), 2)
    h.succeed(*children)
    h.ev("m", "step_ready")
    h.succeed("m")
    h.run_event("run_completed")
    h.replay("m[1]", {"m[1]": "ready", "m": "pending"})  # the expansion is kept
    h.ev("m", "step_ready")
    t = h.claim("m")  # a join, but m[1] is only ready
    h.succeed("m[1]")
    h.ev("m", "step_succeeded", t)
    h.run_event("run_completed")
    return h


def replayed_while_claimed() -> History:
    h = one_step()
    h.claim("a")
    h.replay("a", {"a": "ready"})  # a replay must refuse a running step
    return h  # the worker's attempt was pulled from under it; nothing else shows it


def all_done_pending_after_its_dependency_died() -> History:
    h = History()
    h.new_run({"a": [], "cleanup": ["a"]}, run_if={"cleanup": "all_done"})
    t = h.claim("a")
    h.ev("a", "step_dead_lettered", t, error="boom", retryable=False)
    return h  # cleanup should have become ready with the dead letter


def map_pending_after_its_children_succeeded() -> History:
    h = History()
    h.new_run({"m": []}, maps=("m",))
    for child in h.expand("m", h.claim("m"), 2):
        h.succeed(child)  # the last success should have made m ready for its join
    return h


T0 = datetime(2026, 1, 1, tzinfo=UTC)


def delayed_run() -> History:
    """a -> b, b with delayMs 500: a succeeds, b parks (step_delayed until T0 + 0.5 s)."""
    h = History()
    h.new_run({"a": [], "b": ["a"]})
    h.steps[(R1, "b")]["delay_ms"] = 500
    h.succeed("a")
    until = T0 + timedelta(milliseconds=500)
    h.ev("b", "step_delayed", to="pending", reason="delay", delayMs=500, until=until.isoformat())
    return h


def delayed_claimed_without_sleeping() -> History:
    """b was made ready straight after a (a step_ready with no delay reason)."""
    h = delayed_run()
    h.ev("b", "step_ready")
    h.succeed("b")
    h.run_event("run_completed")
    return h


def delayed_woken_too_early() -> History:
    """b's promotion is written before the until its park said."""
    h = delayed_run()
    h.ev("b", "step_ready", reason="delay", delayMs=500)
    h.events[-1]["created_at"] = T0 + timedelta(milliseconds=100)
    h.succeed("b")
    h.run_event("run_completed")
    return h


def added_without_success() -> History:
    """A steps_added whose transaction did not also record the adder's success (its lease
    expired instead): some of it was written, not all."""
    h = History()
    h.new_run({"plan": [], "a": []})
    t = h.claim("plan")
    h.ev("plan", "steps_added", t, to="running", steps=["a"])
    h.ev("plan", "step_lease_expired", t)
    return h


def waiting_run() -> History:
    """a -> w, w a wait step (wait_signal, its timeout as its delay) parked after a."""
    h = History()
    h.new_run({"a": [], "w": ["a"]})
    h.steps[(R1, "w")].update(delay_ms=1000, wait_signal="go")
    h.succeed("a")
    until = T0 + timedelta(milliseconds=1000)
    h.ev("w", "step_delayed", to="pending", reason="delay", delayMs=1000, until=until.isoformat())
    return h


def wait_step_claimed_by_a_worker() -> History:
    """A worker claimed the wait step (it was made ready, as a sleep would be)."""
    h = waiting_run()
    h.ev("w", "step_ready", reason="delay", delayMs=1000)
    h.events[-1]["created_at"] = T0 + timedelta(milliseconds=1000)
    h.succeed("w")
    h.run_event("run_completed")
    return h


def wait_timed_out_too_early() -> History:
    """The wait step's timeout is written before the deadline its park said."""
    h = waiting_run()
    h.ev("w", "step_dead_lettered", reason="timeout", signal="go")
    h.events[-1]["created_at"] = T0 + timedelta(milliseconds=100)
    h.run_event("run_failed")
    return h


R2 = "22222222-2222-2222-2222-222222222222"
R3 = "33333333-3333-3333-3333-333333333333"


def child_run(*, finish: bool = True) -> History:
    """R1's step sub (kind run) claimed by the maintenance leader naming child run R2, whose
    one step x is claimed; with `finish`, x succeeds, R2 completes and then sub succeeds."""
    h = History()
    h.new_run({"sub": []})
    h.steps[(R1, "sub")]["tool"] = "$run"
    h.new_run({"x": []}, run=R2)
    h.runs[R2].update(parent_run_id=R1, parent_step_id=h.steps[(R1, "sub")]["id"])
    h.run_event("run_started")
    h._token += 1
    h.ev("sub", "step_claimed", h._token, childRunId=R2)
    x = h.claim("x", run=R2)
    if finish:
        h.ev("x", "step_succeeded", x, run=R2)
        h.run_event("run_completed", run=R2)
        h.ev("sub", "step_succeeded", x - 1)
        h.run_event("run_completed")
    return h


def child_run_step_succeeded_before_its_child_ended() -> History:
    h = child_run(finish=False)
    h.ev("sub", "step_succeeded", h._token - 1)
    h.run_event("run_completed")
    h.ev("x", "step_succeeded", h._token, run=R2)
    h.run_event("run_completed", run=R2)
    return h


def second_child_for_one_attempt() -> History:
    """A child run R3 of sub that no claim names (a second child for the one attempt)."""
    h = child_run()
    h.new_run({"y": []}, run=R3)
    h.runs[R3].update(parent_run_id=R1, parent_step_id=h.steps[(R1, "sub")]["id"])
    return h


def cancelled_parent_with_a_running_child() -> History:
    h = child_run(finish=False)
    h.ev("sub", "step_cancelled", h._token - 1, reason="cancelled by request")
    h.run_event("run_cancelled")
    return h


CASES = {
    "claimed while claimed": Case("overlapping_leases", claimed_twice),
    "ended with another token": Case("overlapping_leases", ended_with_another_token),
    "attempt ended twice": Case("overlapping_leases", ended_twice),
    "zombie success after re-claim": Case("stale_token_success", zombie_success),
    "success without a claim": Case("stale_token_success", success_without_claim),
    "claimed before parent succeeded": Case("dependency_not_met", claimed_before_parent_succeeded),
    "claimed below a dead parent": Case("dependency_not_met", claimed_below_dead_parent),
    "claimed after success": Case("terminal_changed", claimed_after_success),
    "claimed after dead letter": Case("terminal_changed", claimed_after_dead_letter),
    "ready after skipped": Case("terminal_changed", ready_after_skipped),
    "completed with a dead letter": Case("run_status_mismatch", completed_with_dead_letter),
    "step status not its last event": Case("run_status_mismatch", step_status_not_its_last_event),
    "running, every step terminal": Case("run_status_mismatch", running_with_every_step_terminal),
    "failed without dead letter": Case("run_status_mismatch", failed_without_dead_letter),
    "failed with a running step": Case("run_status_mismatch", failed_with_unfinished_step),
    "cancelled with a running step": Case("run_status_mismatch", cancelled_with_running_step),
    "run status not its last event": Case("run_status_mismatch", run_status_not_its_last_event),
    "succeeded, no success recorded": Case("success_count", succeeded_without_recorded_success),
    "not idempotent, re-run after lease expiry": Case(
        "non_idempotent_rerun",
        non_idempotent_reclaimed_after("step_lease_expired", reason="lease expired"),
    ),
    "not idempotent, re-run after release": Case(
        "non_idempotent_rerun",
        non_idempotent_reclaimed_after("step_released", reason="worker shutdown"),
    ),
    # The strict at-most-once reading: even the step's own retryable failure may have had
    # its effect, so a second claim before a person's retry is a violation.
    "not idempotent, re-run after own failure": Case(
        "non_idempotent_rerun",
        non_idempotent_reclaimed_after("step_retry_scheduled", error="timeout", retryable=True),
    ),
    "pending though its parents succeeded": Case("stuck_pending", pending_after_parents_succeeded),
    "any_failed claimed, all succeeded": Case(
        "dependency_not_met", any_failed_claimed_though_all_succeeded
    ),
    "all_done claimed before its dependency ended": Case(
        "dependency_not_met", all_done_claimed_before_its_dependency_ended
    ),
    "map joined before a child succeeded": Case(
        "dependency_not_met", map_joined_before_a_child_succeeded
    ),
    "map re-joined before its replayed child succeeded": Case(
        "dependency_not_met", map_rejoined_before_its_replayed_child_succeeded
    ),
    "replayed while claimed": Case("overlapping_leases", replayed_while_claimed),
    "all_done pending after its dependency died": Case(
        "stuck_pending", all_done_pending_after_its_dependency_died
    ),
    "map pending after its children succeeded": Case(
        "stuck_pending", map_pending_after_its_children_succeeded
    ),
    "delayed step claimed without sleeping": Case(
        "delay_not_met", delayed_claimed_without_sleeping
    ),
    "delayed step woken before its time": Case("delay_not_met", delayed_woken_too_early),
    "steps added without the adder's success": Case("added_steps", added_without_success),
    "wait step claimed by a worker": Case("wait_broken", wait_step_claimed_by_a_worker),
    "wait step timed out before its deadline": Case("wait_broken", wait_timed_out_too_early),
    "run step succeeded before its child ended": Case(
        "child_run_mismatch", child_run_step_succeeded_before_its_child_ended
    ),
    "a second child for one attempt": Case("child_run_mismatch", second_child_for_one_attempt),
    "parent cancelled, child still running": Case(
        "child_run_mismatch", cancelled_parent_with_a_running_child
    ),
}


def test_a_clean_child_run_history_passes() -> None:
    report = child_run().check()
    assert report.ok, explain(report)


def test_every_kind_has_a_bad_history() -> None:
    assert {c.kind for c in CASES.values()} == set(KINDS)


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_bad_history_is_caught_as_exactly_its_kind(case: Case) -> None:
    report = case.build().check()
    assert not report.ok
    assert kinds(report) == {case.kind}, explain(report)
    assert all(v.run_id == R1 for v in report.violations)


def test_details_name_event_ids_and_tokens() -> None:
    h = History()
    h.new_run({"a": []})
    t1 = h.claim("a")
    first = h.events[-1]["id"]
    t2 = h.claim("a")
    second = h.events[-1]["id"]
    stale = h.ev("a", "step_succeeded", t1)
    report = h.check()
    by_kind = {v.kind: v for v in report.violations}
    overlap = by_kind["overlapping_leases"]
    assert overlap.step == "a"
    assert f"step_claimed #{second} (token {t2})" in overlap.detail
    assert f"step_claimed #{first} (token {t1})" in overlap.detail
    success = by_kind["stale_token_success"]
    assert f"step_succeeded #{stale} (token {t1})" in success.detail
    assert f"(token {t2})" in success.detail


def test_dependency_violation_names_the_missing_parent() -> None:
    report = claimed_before_parent_succeeded().check()
    [v] = report.violations
    assert v.step == "b"
    assert "'a'" in v.detail and "its first step_succeeded is #" in v.detail


def test_non_idempotent_claims_are_counted_per_manual_retry() -> None:
    h = one_step(not_idempotent=True)
    t = h.claim("a")
    h.ev("a", "step_dead_lettered", t, reason="lease expired")
    h.run_event("run_failed")
    assert h.check().non_idempotent_for_review == 1
    h.ev("a", "step_retried")
    h.run_event("run_resumed")
    t = h.claim("a")
    h.ev("a", "step_succeeded", t)
    h.run_event("run_completed")
    report = h.check()
    assert report.ok, explain(report)
    assert report.non_idempotent_for_review == 0  # reviewed: no longer in dead_letter


# --- trigger rules, map fan-out, replay: clean histories ------------------------------------


def test_all_done_and_any_failed_steps_claimed_after_a_dead_dependency_are_fine() -> None:
    """work dies: next (all_succeeded) is skipped and after_next with it; cleanup (all_done)
    and alert (any_failed) run, after_skip (all_done) runs after its skipped dependency."""
    h = History()
    h.new_run(
        {
            "work": [],
            "other": [],
            "next": ["work"],
            "after_next": ["next"],
            "cleanup": ["work", "other"],
            "alert": ["work"],
            "after_skip": ["next"],
        },
        run_if={"cleanup": "all_done", "alert": "any_failed", "after_skip": "all_done"},
    )
    to = h.claim("other")
    t = h.claim("work")
    h.ev("work", "step_dead_lettered", t, error="boom", retryable=False)
    h.ev("next", "step_skipped")
    h.ev("alert", "step_ready")
    h.ev("after_next", "step_skipped")
    h.ev("after_skip", "step_ready")
    report = h.check()
    assert report.ok, explain(report)  # all_done waits for other, though work is dead
    h.ev("other", "step_succeeded", to)
    h.ev("cleanup", "step_ready")
    h.succeed("cleanup", "alert", "after_skip")
    h.run_event("run_failed")
    report = h.check()
    assert report.ok, explain(report)


def test_completed_run_with_rule_skipped_steps_is_fine() -> None:
    """Everything succeeds: the any_failed branch is skipped (its all_succeeded dependent in
    cascade), the all_done notify runs, and the run is completed, not failed."""
    h = History()
    h.new_run(
        {"a": [], "on_fail": ["a"], "page": ["on_fail"], "notify": ["page", "a"]},
        run_if={"on_fail": "any_failed", "notify": "all_done"},
    )
    h.succeed("a")
    h.ev("on_fail", "step_skipped")
    h.ev("page", "step_skipped")
    h.ev("notify", "step_ready")
    h.succeed("notify")
    h.run_event("run_completed")
    report = h.check()
    assert report.ok, explain(report)
    h.runs[R1]["status"] = "failed"  # a skipped step does not make a run failed
    assert kinds(h.check()) == {"run_status_mismatch"}


def test_manual_retry_of_a_dependency_does_not_take_back_a_decided_dependent() -> None:
    """work dies, cleanup (all_done) and alert (any_failed) become ready; a person retries
    work before they are claimed (the retry leaves ready dependents alone). Their claims
    while work runs again, or after it succeeded, are what the engine does: fine."""
    h = History()
    h.new_run(
        {"work": [], "cleanup": ["work"], "alert": ["work"]},
        run_if={"cleanup": "all_done", "alert": "any_failed"},
    )
    t = h.claim("work")
    h.ev("work", "step_dead_lettered", t, error="boom", retryable=False)
    h.ev("cleanup", "step_ready")
    h.ev("alert", "step_ready")
    h.ev("work", "step_retried", reason="manual retry")
    h.succeed("cleanup")  # work is ready again
    h.succeed("work")
    h.succeed("alert")  # work has succeeded by now
    h.run_event("run_completed")
    report = h.check()
    assert report.ok, explain(report)


def map_run(*, not_idempotent: bool = False) -> History:
    """list -> m (a map step over 3 elements; m[1] fails once and is retried, unless the
    step is "idempotent": false, which its children inherit) -> after."""
    h = History()
    h.new_run(
        {"list": [], "m": ["list"], "after": ["m"]},
        maps=("m",),
        not_idempotent=("m",) if not_idempotent else (),
    )
    h.succeed("list")
    h.ev("m", "step_ready")
    children = h.expand("m", h.claim("m"), 3)
    if not not_idempotent:
        t = h.claim(children[1])
        h.ev(children[1], "step_retry_scheduled", t, error="transient", retryable=True)
    h.succeed(*children)
    h.ev("m", "step_ready")
    h.succeed("m")  # the join
    h.ev("after", "step_ready")
    h.succeed("after")
    h.run_event("run_completed")
    return h


def test_map_step_with_expansion_and_join_claims_is_fine() -> None:
    h = map_run()
    report = h.check()
    assert report.ok, explain(report)
    assert (report.steps, report.attempts, report.retries) == (6, 8, 1)
    claims = [e for e in h.events if e["step_name"] == "m" and e["event"] == "step_claimed"]
    assert len(claims) == 2  # expansion, then join


def test_non_idempotent_map_step_is_not_a_rerun() -> None:
    """A map step's two claims run no tool of its own: not an at-most-once violation."""
    report = map_run(not_idempotent=True).check()
    assert report.ok, explain(report)


def test_empty_map_joins_at_once() -> None:
    h = History()
    h.new_run({"m": []}, maps=("m",))
    assert h.expand("m", h.claim("m"), 0) == []  # running -> ready: the join is next
    h.succeed("m")
    h.run_event("run_completed")
    report = h.check()
    assert report.ok, explain(report)


def test_replay_reopening_succeeded_steps_then_new_successes_is_fine() -> None:
    """a -> b ("idempotent": false) completes, is replayed from a, and completes again:
    each step has two step_succeeded in all but one since its step_replayed, and b's second
    claim follows a person's replay, not an automatic re-run."""
    h = History()
    h.new_run({"a": [], "b": ["a"]}, not_idempotent=("b",))
    h.succeed("a")
    h.ev("b", "step_ready")
    h.succeed("b")
    h.run_event("run_completed")
    h.replay("a", {"a": "ready", "b": "pending"})
    assert h.runs[R1]["status"] == "running"
    h.succeed("a")
    h.ev("b", "step_ready")
    h.succeed("b")
    h.run_event("run_completed")
    report = h.check()
    assert report.ok, explain(report)
    h.events = [e for e in h.events if (e["step_name"], e["event"]) != ("b", "step_replayed")]
    assert {"success_count", "terminal_changed", "non_idempotent_rerun"} <= kinds(h.check())


def test_replay_from_a_map_child_keeps_the_expansion() -> None:
    """Replayed from m[1]: m keeps its children and its next claim is a join, judged
    against its children; replayed from list: m's children are deleted, it expands again
    into new ones, and the old join is not judged against them."""
    h = map_run()
    h.replay("m[1]", {"m[1]": "ready", "m": "pending", "after": "pending"})
    h.succeed("m[1]")
    h.ev("m", "step_ready")
    h.succeed("m")
    h.ev("after", "step_ready")
    h.succeed("after")
    h.run_event("run_completed")
    report = h.check()
    assert report.ok, explain(report)

    h.replay("list", {"list": "ready", "m": "pending", "after": "pending"}, unexpand=("m",))
    assert (R1, "m[0]") not in h.steps
    h.succeed("list")
    h.ev("m", "step_ready")
    children = h.expand("m", h.claim("m"), 2)
    h.succeed(*children)
    h.ev("m", "step_ready")
    h.succeed("m")
    h.ev("after", "step_ready")
    h.succeed("after")
    h.run_event("run_completed")
    report = h.check()
    assert report.ok, explain(report)


def test_replay_deciding_a_dependent_in_the_same_statement() -> None:
    """A reset statement writes its step_replayed rows in no particular order: judged after
    the whole statement. x (any_failed) was decided ready when w died and stayed ready
    across w's manual retry; a replay from x skips it (w succeeded by now) and decides its
    all_done dependent s ready, in the same statement, s's row written first."""
    h = History()
    h.new_run({"w": [], "x": ["w"], "s": ["x"]}, run_if={"x": "any_failed", "s": "all_done"})
    t = h.claim("w")
    h.ev("w", "step_dead_lettered", t, error="boom", retryable=False)
    h.ev("x", "step_ready")
    h.ev("w", "step_retried", reason="manual retry")
    h.succeed("w")
    h.replay("x", {"s": "ready", "x": "skipped"})  # x is still ready at s's step_replayed
    h.succeed("s")
    h.run_event("run_completed")
    report = h.check()
    assert report.ok, explain(report)


def test_delayed_root_waits_pending() -> None:
    h = History()
    h.new_run({"a": [], "b": ["a"]}, start_at=datetime(2030, 1, 1, tzinfo=UTC))
    report = h.check()
    assert report.ok, explain(report)  # a waits for the start time, not stuck
    h.ev("a", "step_ready", reason="startAt")
    h.succeed("a")
    h.ev("b", "step_ready")
    h.succeed("b")
    h.run_event("run_completed")
    report = h.check()
    assert report.ok, explain(report)
    undelayed = History()
    undelayed.new_run({"a": []})
    undelayed.steps[(R1, "a")]["status"] = "pending"  # no start time: nothing promotes it
    assert kinds(undelayed.check()) == {"stuck_pending"}


def test_a_parked_step_waits_pending_and_sleeps_before_its_claim() -> None:
    """A step with delay_ms whose dependencies are done is parked, not stuck; woken by a
    step_ready with reason delay at or after its until, its claim is clean, and so is a
    manual retry of it, which runs it at once."""
    h = delayed_run()
    assert h.check().ok, explain(h.check())  # parked: not stuck_pending
    h.ev("b", "step_ready", reason="delay", delayMs=500)
    h.events[-1]["created_at"] = T0 + timedelta(milliseconds=500)
    t = h.claim("b")
    h.ev("b", "step_dead_lettered", t, error="boom", retryable=False)
    h.run_event("run_failed")
    h.ev("b", "step_retried")
    h.run_event("run_resumed")
    h.succeed("b")
    h.run_event("run_completed")
    report = h.check()
    assert report.ok, explain(report)
    root = History()
    root.new_run({"r": []})
    root.steps[(R1, "r")].update(delay_ms=100, status="pending")  # a root parked at insert
    assert root.check().ok, explain(root.check())


def test_a_wait_step_signalled_or_timed_out_at_its_deadline_is_clean() -> None:
    """A parked wait step is not stuck; a step_signalled opens an attempt its success ends
    under the same token; a timeout at the deadline (waiting again, then dead_letter) ends
    no attempt."""
    h = waiting_run()
    assert h.check().ok, explain(h.check())
    h._token += 1
    t = h._token
    h.ev("w", "step_signalled", t, signal="go", signalId="k")
    h.ev("w", "step_succeeded", t)
    h.run_event("run_completed")
    assert h.check().ok, explain(h.check())

    late = waiting_run()
    again = T0 + timedelta(milliseconds=2000)
    late.ev("w", "step_wait_timed_out", reason="timeout", until=again.isoformat())
    late.events[-1]["created_at"] = T0 + timedelta(milliseconds=1000)
    late.ev("w", "step_dead_lettered", reason="timeout")
    late.events[-1]["created_at"] = again
    late.run_event("run_failed")
    assert late.check().ok, explain(late.check())


def test_missing_step_rows_do_not_crash() -> None:
    """Events of a step whose row is gone, and a join whose child row is gone, are reported
    (or not judged), never a crash."""
    h = map_run()
    del h.steps[(R1, "m[2]")]
    report = h.check()
    assert kinds(report) == {"run_status_mismatch"}, explain(report)
    assert [v.step for v in report.violations] == ["m[2]"]


# --- against a real database ------------------------------------------------------------------


DIAMOND = {
    "steps": [
        {"name": "a", "tool": "DELAY", "input": {"ms": 0}},
        {"name": "b", "tool": "DELAY", "input": {"ms": 0}, "dependsOn": ["a"]},
        {"name": "c", "tool": "DELAY", "input": {"ms": 0}, "dependsOn": ["a"]},
        {"name": "d", "tool": "DELAY", "input": {"ms": 0}, "dependsOn": ["b", "c"]},
    ]
}


def drive_diamond(db_url: str) -> str:
    """Submit DIAMOND and take it to completion with the engine's Store in-process: a fails
    once (retryable, no backoff), then every step succeeds."""
    from engine.db import open_pool
    from engine.store import Store

    run_id = submit(db_url, DIAMOND)

    async def go() -> None:
        pool = await open_pool(db_url, min_size=1, max_size=2)
        try:
            store = Store(pool, lease_ttl_s=30)
            [a] = await store.claim("w1", 10)
            outcome = await store.fail(
                a,
                error="transient",
                retryable=True,
                worker_id="w1",
                backoff_base_ms=0,
                backoff_cap_ms=0,
            )
            assert outcome.status == "ready"
            [a] = await store.claim("w1", 10)
            await store.complete(a, "{}", worker_id="w1")
            middle = await store.claim("w2", 10)
            assert sorted(s.name for s in middle) == ["b", "c"]
            for s in middle:
                await store.complete(s, '{"ok": true}', worker_id="w2")
            [d] = await store.claim("w1", 10)
            await store.complete(d, "{}", worker_id="w1")
        finally:
            await pool.close()

    asyncio.run(go())
    return run_id


def check_db(db_url: str, run_ids: list[str] | None) -> Report:
    with psycopg.connect(db_url) as conn:  # tuple rows, not autocommit: the checker copes
        report = check_database(conn, run_ids)
        assert conn.info.transaction_status == TransactionStatus.IDLE
    return report


def test_check_database_on_an_engine_driven_run(db_url: str) -> None:
    run_id = drive_diamond(db_url)
    other = submit(db_url, {"steps": [{"name": "x", "tool": "DELAY", "input": {"ms": 0}}]})
    report = check_db(db_url, [run_id])
    assert report.ok, explain(report)
    assert (report.runs, report.steps, report.attempts, report.retries) == (1, 4, 5, 1)
    everything = check_db(db_url, None)
    assert everything.ok, explain(everything)
    assert (everything.runs, everything.steps) == (2, 5)
    assert check_db(db_url, [other]).attempts == 0


def corrupt_second_success(db_url: str, run_id: str) -> tuple[str, str]:
    [row] = query(
        db_url,
        "INSERT INTO audit_log (run_id, step_id, step_name, event, from_status, to_status,"
        " attempt, lease_token, worker_id)"
        " SELECT run_id, step_id, step_name, event, from_status, to_status, attempt,"
        " lease_token, 'intruder' FROM audit_log"
        " WHERE run_id = %(id)s AND step_name = 'd' AND event = 'step_succeeded'"
        " RETURNING id",
        {"id": run_id},
    )
    return "success_count", f"step_succeeded #{row['id']}"


def corrupt_step_back_to_running(db_url: str, run_id: str) -> tuple[str, str]:
    query(
        db_url,
        "UPDATE steps SET status = 'running' WHERE run_id = %(id)s AND name = 'b'",
        {"id": run_id},
    )
    return "run_status_mismatch", "steps table says running"


def corrupt_stale_token_success(db_url: str, run_id: str) -> tuple[str, str]:
    [row] = query(
        db_url,
        "SELECT lease_token FROM audit_log WHERE run_id = %(id)s AND step_name = 'a'"
        " AND event = 'step_claimed' ORDER BY id LIMIT 1",
        {"id": run_id},
    )
    query(
        db_url,
        "UPDATE audit_log SET lease_token = %(t)s"
        " WHERE run_id = %(id)s AND step_name = 'a' AND event = 'step_succeeded'",
        {"id": run_id, "t": row["lease_token"]},
    )
    return "stale_token_success", f"token {row['lease_token']}"


@pytest.mark.parametrize(
    "corrupt",
    [corrupt_second_success, corrupt_step_back_to_running, corrupt_stale_token_success],
    ids=["second step_succeeded", "step set back to running", "success under the first token"],
)
def test_check_database_names_a_hand_corruption(
    db_url: str, corrupt: Callable[[str, str], tuple[str, str]]
) -> None:
    run_id = drive_diamond(db_url)
    assert check_db(db_url, [run_id]).ok
    kind, needle = corrupt(db_url, run_id)
    report = check_db(db_url, [run_id])
    named = [v for v in report.violations if v.kind == kind]
    assert named, explain(report)
    assert any(needle in v.detail for v in named), explain(report)


# --- the side-effect ledger -------------------------------------------------------------------

T0 = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def test_ledger_request_after_success_is_a_duplicate() -> None:
    requests = [("r:a", at(1)), ("r:a", at(5))]
    assert ledger_duplicates(requests, {"r:a": at(2)}) == (1, 0)


def test_ledger_extra_requests_before_success_are_at_least_once_reruns() -> None:
    requests = [("r:a", at(1)), ("r:a", at(3)), ("r:a", at(4)), ("r:b", at(1))]
    assert ledger_duplicates(requests, {"r:a": at(10), "r:b": at(2)}) == (0, 2)


def test_ledger_clean_and_edge_cases() -> None:
    requests = [
        ("r:a", at(1)),
        ("r:b", at(2)),  # arrives at the very instant of the record: not after it
        ("r:c", at(1)),
        ("r:c", at(2)),  # never succeeded (dead letter): a re-send, not a duplicate
        ("", at(9)),  # no key: not attributable to a step
    ]
    succeeded_at = {"r:a": at(2), "r:b": at(2)}
    assert ledger_duplicates(requests, succeeded_at) == (0, 1)
    assert ledger_duplicates([], succeeded_at) == (0, 0)
