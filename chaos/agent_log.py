"""Judge the agents' idempotency logs against the audit log.

Every outcome an agent executed is written to its local SQLite log before it is reported
(`workers.agent_log`). After a chaos run with agents, each logged outcome must have ended in
one of two ways, and the audit log must agree with what the agent was told:

``recorded``
    The API accepted it: the audit log holds the event that ended that claim (same step,
    same fencing token) with the outcome's meaning: ``step_succeeded`` for a success;
    ``step_retry_scheduled`` or ``step_dead_lettered`` for a failure (a success Postgres
    refused to store ends as ``step_dead_lettered`` too).
``refused``
    The fencing token was no longer current: the audit log must hold NO success under that
    token (the claim ended otherwise: lease expired, released, cancelled).

Violation kinds: ``outcome_pending`` (logged, never answered: neither recorded nor refused),
``recorded_not_in_audit`` (the agent was told recorded, the audit log disagrees) and
``refused_but_recorded`` (the agent was told refused, yet a success with its token is in
the audit log). `check_agent_logs` reads the files read-only; it never changes them.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
from psycopg.rows import dict_row

LOG_TABLE = "outcomes"  # workers.agent_log's table

SUCCESS_END = frozenset({"step_succeeded"})
FAILURE_END = frozenset({"step_retry_scheduled", "step_dead_lettered"})


@dataclass(frozen=True)
class LoggedOutcome:
    """One row of an agent's log: which attempt (step id, fencing token), what the agent
    reported (``succeeded`` / ``failed``) and what it was answered (``state``)."""

    log: str
    step_id: int
    lease_token: int
    status: str
    state: str
    reason: str | None


@dataclass(frozen=True)
class LogViolation:
    """A logged outcome whose fate breaks the rule above; `detail` says how."""

    kind: str
    outcome: LoggedOutcome
    detail: str


@dataclass
class AgentLogReport:
    """Counts of logged outcomes by final state, and the violations found."""

    logged: int = 0
    recorded: int = 0
    refused: int = 0
    violations: list[LogViolation] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True when every logged outcome was recorded or refused, as the audit log says."""
        return not self.violations


def read_logs(paths: Iterable[Path]) -> list[LoggedOutcome]:
    """Every outcome in the agent logs at `paths` (missing files are skipped: an agent
    killed before it executed anything may never have created one)."""
    out: list[LoggedOutcome] = []
    for path in paths:
        if not path.exists():
            continue
        db = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)
        db.row_factory = sqlite3.Row
        try:
            rows = db.execute(
                f"SELECT step_id, lease_token, status, state, reason FROM {LOG_TABLE}"
            ).fetchall()
        finally:
            db.close()
        out.extend(
            LoggedOutcome(
                log=path.name,
                step_id=int(row["step_id"]),
                lease_token=int(row["lease_token"]),
                status=str(row["status"]),
                state=str(row["state"]),
                reason=row["reason"],
            )
            for row in rows
        )
    return out


ANSWERED_STATES = frozenset({"recorded", "refused"})


def unanswered(paths: Iterable[Path]) -> int:
    """How many outcomes in the agent logs at `paths` are not answered yet (``pending``:
    written, and sent or not, no answer came). An agent re-sends them (at its next start,
    from its re-sender, and once more when it stops), so the driver waits for this to reach
    0 before it stops the agents and judges the logs. Raises `sqlite3.OperationalError`
    when a log cannot be read at this instant."""
    return sum(1 for o in read_logs(paths) if o.state not in ANSWERED_STATES)


def check_outcomes(
    outcomes: list[LoggedOutcome], ends: dict[tuple[int, int], set[str]]
) -> AgentLogReport:
    """Judge `outcomes` against `ends`: for each (step_id, lease_token), the audit events
    that ended or recorded that claim. Pure, for hand-made histories."""
    report = AgentLogReport(logged=len(outcomes))
    for o in outcomes:
        events = ends.get((o.step_id, o.lease_token), set())
        if o.state == "recorded":
            report.recorded += 1
            want = SUCCESS_END if o.status == "succeeded" else FAILURE_END
            if not events & want:
                report.violations.append(
                    LogViolation(
                        "recorded_not_in_audit",
                        o,
                        f"told recorded, audit events for token {o.lease_token}: "
                        f"{sorted(events) or 'none'}",
                    )
                )
        elif o.state == "refused":
            report.refused += 1
            if "step_succeeded" in events:
                report.violations.append(
                    LogViolation(
                        "refused_but_recorded",
                        o,
                        f"told refused ({o.reason}), but step_succeeded under token "
                        f"{o.lease_token} is in the audit log",
                    )
                )
        else:
            report.violations.append(
                LogViolation("outcome_pending", o, f"state {o.state!r}: never answered")
            )
    return report


def check_agent_logs(conn: psycopg.Connection[Any], paths: Iterable[Path]) -> AgentLogReport:
    """Read the logs at `paths` and judge them against the audit log behind `conn`."""
    outcomes = read_logs(paths)
    ids = sorted({o.step_id for o in outcomes})
    ends: dict[tuple[int, int], set[str]] = {}
    if ids:
        with conn.cursor(row_factory=dict_row) as cur:
            cur.execute(
                "SELECT step_id, lease_token, event FROM audit_log"
                " WHERE step_id = ANY(%s) AND lease_token IS NOT NULL",
                (ids,),
            )
            for r in cur.fetchall():
                ends.setdefault((r["step_id"], r["lease_token"]), set()).add(r["event"])
    return check_outcomes(outcomes, ends)


__all__ = [
    "AgentLogReport",
    "LogViolation",
    "LoggedOutcome",
    "check_agent_logs",
    "check_outcomes",
    "read_logs",
]
