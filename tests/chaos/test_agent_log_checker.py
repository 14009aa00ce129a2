"""The agent-log checker judges each logged outcome by what the audit log holds for its
(step, fencing token): hand-made histories, one per rule, each of which must be caught."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from chaos.agent_log import LoggedOutcome, check_outcomes, unanswered
from workers.agent_log import _SCHEMA


def outcome(state: str, status: str = "succeeded", token: int = 7) -> LoggedOutcome:
    return LoggedOutcome("a.sqlite3", 1, token, status, state, None)


def kinds(outcomes: list[LoggedOutcome], ends: dict[tuple[int, int], set[str]]) -> list[str]:
    return [v.kind for v in check_outcomes(outcomes, ends).violations]


def test_recorded_success_with_its_audit_event_passes() -> None:
    report = check_outcomes([outcome("recorded")], {(1, 7): {"step_claimed", "step_succeeded"}})
    assert report.ok and (report.logged, report.recorded, report.refused) == (1, 1, 0)


def test_recorded_success_missing_from_the_audit_log_is_a_violation() -> None:
    assert kinds([outcome("recorded")], {(1, 7): {"step_claimed", "step_lease_expired"}}) == [
        "recorded_not_in_audit"
    ]


def test_recorded_success_under_another_token_does_not_count() -> None:
    assert kinds([outcome("recorded", token=7)], {(1, 8): {"step_succeeded"}}) == [
        "recorded_not_in_audit"
    ]


def test_recorded_failure_needs_a_retry_or_dead_letter_event() -> None:
    ok = {(1, 7): {"step_claimed", "step_retry_scheduled"}}
    assert kinds([outcome("recorded", status="failed")], ok) == []
    bad = {(1, 7): {"step_claimed", "step_succeeded"}}
    assert kinds([outcome("recorded", status="failed")], bad) == ["recorded_not_in_audit"]


def test_refused_outcome_passes_when_its_claim_ended_otherwise() -> None:
    report = check_outcomes([outcome("refused")], {(1, 7): {"step_lease_expired"}})
    assert report.ok and report.refused == 1


def test_refused_outcome_whose_success_is_in_the_audit_log_is_a_violation() -> None:
    assert kinds([outcome("refused")], {(1, 7): {"step_succeeded"}}) == ["refused_but_recorded"]


def test_an_outcome_never_answered_is_a_violation() -> None:
    assert kinds([outcome("pending")], {(1, 7): {"step_succeeded"}}) == ["outcome_pending"]


def test_unanswered_counts_the_pending_outcomes_of_real_logs(tmp_path: Path) -> None:
    log = tmp_path / "a.sqlite3"
    db = sqlite3.connect(log)
    db.executescript(_SCHEMA)
    states = ["pending", "pending", "recorded", "refused", "recorded"]
    db.executemany(
        "INSERT INTO outcomes (step_id, lease_token, run_id, name, attempt, status, body,"
        " state, logged_at) VALUES (?, ?, 'r', 's', 1, 'succeeded', '{}', ?, 0)",
        [(i, i, st) for i, st in enumerate(states)],
    )
    db.commit()
    assert unanswered([log, tmp_path / "missing.sqlite3"]) == 2
    db.execute("UPDATE outcomes SET state = 'recorded'")
    db.commit()
    db.close()
    assert unanswered([log]) == 0
