"""The agent's SQLite idempotency log (workers/agent_log.py), on real files."""

from __future__ import annotations

import json
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from workers.agent_log import AgentLog, LoggedOutcome, failure_body, success_body


def outcome(step_id: int, token: int, *, status: str = "succeeded") -> LoggedOutcome:
    body = (
        success_body(step_id, token, '{"n":1}')
        if status == "succeeded"
        else failure_body(step_id, token, error="boom", retryable=True)
    )
    return LoggedOutcome(
        step_id=step_id,
        lease_token=token,
        run_id="r1",
        name=f"s{step_id}",
        attempt=1,
        status=status,
        body=body,
        lease_expires_at="2026-01-01T00:00:30+00:00",
    )


def test_bodies_are_the_report_outcomes() -> None:
    assert json.loads(success_body(3, 9, '{"a":[1,2]}')) == {
        "stepId": 3,
        "leaseToken": 9,
        "status": "succeeded",
        "output": {"a": [1, 2]},
    }
    assert json.loads(failure_body(3, 9, error="x", retryable=False)) == {
        "stepId": 3,
        "leaseToken": 9,
        "status": "failed",
        "error": "x",
        "retryable": False,
    }


def test_written_outcome_is_pending_on_disk_before_any_report(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "agent.sqlite3"  # the directory is made
    log = AgentLog(path)
    log.write([outcome(1, 10), outcome(2, 20, status="failed")])
    # another connection (another process would see the same) finds both, pending
    with sqlite3.connect(path) as other:
        rows = other.execute("SELECT step_id, state FROM outcomes ORDER BY step_id").fetchall()
    assert rows == [(1, "pending"), (2, "pending")]
    assert [o.key for o in log.pending()] == [(1, 10), (2, 20)]
    synchronous = log._db.execute("PRAGMA synchronous").fetchone()[0]
    assert synchronous == 2  # FULL: each commit is fsync'd
    log.close()


def test_answers_update_rows_and_leave_pending_list(tmp_path: Path) -> None:
    log = AgentLog(tmp_path / "a.sqlite3")
    log.write([outcome(1, 10), outcome(2, 20), outcome(3, 30)])
    log.sent([(1, 10), (2, 20)])
    log.answered(
        [
            (1, 10, "recorded", None, None),
            (2, 20, "refused", "lease_lost", "step 2 is held by token 21"),
        ]
    )
    assert [o.key for o in log.pending()] == [(3, 30)]
    one, two = log.get(1, 10), log.get(2, 20)
    assert one is not None and one.state == "recorded" and one.sends == 1
    assert one.answered_at is not None
    assert two is not None and (two.state, two.reason) == ("refused", "lease_lost")
    assert two.message == "step 2 is held by token 21"
    # an answer is final: a later answer does not change it
    log.answered([(2, 20, "recorded", None, None)])
    assert log.get(2, 20).state == "refused"  # type: ignore[union-attr]
    with pytest.raises(ValueError, match="recorded or refused"):
        log.answered([(3, 30, "pending", None, None)])
    log.close()


def test_first_outcome_of_an_attempt_is_kept(tmp_path: Path) -> None:
    log = AgentLog(tmp_path / "a.sqlite3")
    log.write([outcome(1, 10)])
    log.write([outcome(1, 10, status="failed")])
    row = log.get(1, 10)
    assert row is not None and row.status == "succeeded"
    assert len(log.all()) == 1
    log.close()


def test_held_outcome_means_the_attempt_is_not_run_again(tmp_path: Path) -> None:
    log = AgentLog(tmp_path / "a.sqlite3")
    log.write([outcome(1, 10)])
    assert log.holds(1, 10)
    assert not log.holds(1, 11)  # a new attempt of the same step (new token) may run
    assert not log.holds(2, 10)
    log.close()


def test_extend_updates_lease_expiry_of_pending_rows(tmp_path: Path) -> None:
    log = AgentLog(tmp_path / "a.sqlite3")
    log.write([outcome(1, 10)])
    log.extend([(1, 10, "2026-01-01T00:01:00+00:00")])
    assert log.get(1, 10).lease_expires_at == "2026-01-01T00:01:00+00:00"  # type: ignore[union-attr]
    log.close()


CRASH = """
import os, signal, sys
from workers.agent_log import AgentLog, LoggedOutcome, success_body
log = AgentLog(sys.argv[1])
log.write([LoggedOutcome(step_id=7, lease_token=70, run_id="r", name="s", attempt=2,
                         status="succeeded", body=success_body(7, 70, "[1]"))])
os.kill(os.getpid(), signal.SIGKILL)  # crash between logging and reporting
"""


def test_pending_rows_survive_a_crash(tmp_path: Path) -> None:
    path = tmp_path / "a.sqlite3"
    proc = subprocess.run([sys.executable, "-c", CRASH, str(path)], check=False)
    assert proc.returncode == -signal.SIGKILL
    log = AgentLog(path)
    [row] = log.pending()
    assert (row.key, row.attempt, row.state) == ((7, 70), 2, "pending")
    assert json.loads(row.body)["output"] == [1]
    assert log.holds(7, 70)
    log.close()


def test_old_answered_rows_are_pruned_at_open_pending_ones_never(tmp_path: Path) -> None:
    path = tmp_path / "a.sqlite3"
    log = AgentLog(path)
    log.write([outcome(1, 10), outcome(2, 20)])
    log.answered([(1, 10, "recorded", None, None)])
    log.close()
    log = AgentLog(path, keep_answered_s=-1)  # everything answered is "old"
    assert [o.key for o in log.all()] == [(2, 20)]
    log.close()


def test_held_finds_the_logged_attempts_of_a_claim(tmp_path: Path) -> None:
    log = AgentLog(tmp_path / "agent.sqlite3")
    log.write([outcome(1, 10), outcome(2, 20, status="failed")])
    claim = [(1, 10), (1, 11), (2, 20), (3, 30)]  # (1, 11): a later attempt of step 1
    assert log.held(claim) == {(1, 10), (2, 20)}
    assert log.held([]) == set()
    assert all(log.holds(*key) == (key in log.held(claim)) for key in claim)
