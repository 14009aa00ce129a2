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

    def new_run(
        self, deps: dict[str, list[str]], *, run: str = R1, not_idempotent: tuple[str, ...] = ()
    ) -> None:
        self.runs[run] = {"id": run, "status": None}
        for name, d in deps.items():
            self.steps[(run, name)] = {
                "id": len(self.steps) + 1,
                "run_id": run,
                "name": name,
                "status": "pending" if d else "ready",
                "idempotent": name not in not_idempotent,
                "depends_on": d,
            }
        self.run_event("run_created", run=run)

    def run_event(self, event: str, *, run: str = R1) -> int:
        row = self.runs[run]
        return self._append(run, None, event, row["status"], RUN_EVENT_STATUS[event], row)

    def ev(
        self, step: str, event: str, token: int | None = None, *, run: str = R1, **detail: Any
    ) -> int:
        """Append a step event; returns its id."""
        row = self.steps[(run, step)]
        to = STEP_EVENT_STATUS[event]
        return self._append(run, step, event, row["status"], to, row, token, detail or None)

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
        event_id = len(self.events) + 1
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
}


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
