"""The agent's idempotency log: the outcomes it finished, kept in a local SQLite file.

An agent (``python -m workers --server URL``) writes every outcome here, durably
(``PRAGMA synchronous=FULL``: fsync'd at each commit), BEFORE it reports it to the API;
the API's answer then updates the row. So an outcome survives an API that is down, a
network cut and a crash of the agent between running a tool and reporting it::

    tool returned --write--> pending --report answered--> recorded   (or duplicate)
                                |                  \\----> refused   (reason: lease_lost,
                                |                                    output_refused)
                                +-- agent restarted: re-reported before any claim

One row per attempt, keyed by ``(step_id, lease_token)`` (the fencing token names the
attempt): the agent never runs an attempt whose outcome the log holds. Answered rows are
kept `KEEP_ANSWERED_S` for inspection (``sqlite3 FILE 'select * from outcomes'``), then
deleted when the log is opened.

The statements are SQLite, on a file of the agent's own, not Postgres: they live here, not
in engine/sql/queries.sql (the worker still holds no SQL of the engine's database).
Methods are blocking (a commit waits for fsync: milliseconds); `workers.agent` calls them
in a thread. One `AgentLog` may be used from several threads (a lock serialises them).
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

KEEP_ANSWERED_S = 7 * 86400.0  # answered rows are deleted this long after their answer
STATES: Final = ("pending", "recorded", "refused")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS outcomes (
    step_id          INTEGER NOT NULL,
    lease_token      INTEGER NOT NULL,
    run_id           TEXT    NOT NULL,
    name             TEXT    NOT NULL,
    attempt          INTEGER NOT NULL,
    status           TEXT    NOT NULL CHECK (status IN ('succeeded', 'failed')),
    body             TEXT    NOT NULL,  -- the outcome as sent in POST /agent/report
    lease_expires_at TEXT,              -- ISO-8601, the API's clock, last known
    state            TEXT    NOT NULL DEFAULT 'pending'
                             CHECK (state IN ('pending', 'recorded', 'refused')),
    reason           TEXT,              -- refusal code (lease_lost, output_refused), or
                                        -- 'duplicate' for a repeat the API had recorded
    message          TEXT,              -- the API's words with a refusal
    sends            INTEGER NOT NULL DEFAULT 0,
    logged_at        REAL    NOT NULL,  -- unix seconds
    last_sent_at     REAL,
    answered_at      REAL,
    PRIMARY KEY (step_id, lease_token)
)
"""
_INSERT = """
INSERT OR IGNORE INTO outcomes
    (step_id, lease_token, run_id, name, attempt, status, body, lease_expires_at, logged_at)
VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)
"""
_COLUMNS = (
    "step_id, lease_token, run_id, name, attempt, status, body, lease_expires_at, state, "
    "reason, message, sends, logged_at, last_sent_at, answered_at"
)


@dataclass(frozen=True)
class LoggedOutcome:
    """One row of the log. `body` is the outcome's JSON text as reported (``stepId``,
    ``leaseToken``, ``status`` and ``output`` or ``error`` + ``retryable``); times are unix
    seconds."""

    step_id: int
    lease_token: int
    run_id: str
    name: str
    attempt: int
    status: str
    body: str
    lease_expires_at: str | None = None
    state: str = "pending"
    reason: str | None = None
    message: str | None = None
    sends: int = 0
    logged_at: float = 0.0
    last_sent_at: float | None = None
    answered_at: float | None = None

    @property
    def key(self) -> tuple[int, int]:
        """``(step_id, lease_token)``: the attempt."""
        return (self.step_id, self.lease_token)


def success_body(
    step_id: int, lease_token: int, output_json: str, *, add_steps: list[Any] | None = None
) -> str:
    """The report outcome of a success, `output_json` being the output's JSON text
    (embedded as is: a large output is not decoded and encoded again), with ``addSteps``
    when the tool added steps (`add_steps`, JSON-encodable; raises `TypeError` or
    `ValueError` when they are not)."""
    added = ""
    if add_steps is not None:
        added = ',"addSteps":' + json.dumps(add_steps, separators=(",", ":"), allow_nan=False)
    return (
        f'{{"stepId":{int(step_id)},"leaseToken":{int(lease_token)},'
        f'"status":"succeeded","output":{output_json}{added}}}'
    )


def failure_body(step_id: int, lease_token: int, *, error: str, retryable: bool) -> str:
    """The report outcome of a failed attempt."""
    return json.dumps(
        {
            "stepId": step_id,
            "leaseToken": lease_token,
            "status": "failed",
            "error": error,
            "retryable": retryable,
        },
        separators=(",", ":"),
    )


class AgentLog:
    """The log in the SQLite file `path` (created with its directory when missing).

    Raises `sqlite3.Error` when the file cannot be opened or written (a full disk, a
    directory that cannot be made): the agent must not report what it could not log.
    """

    def __init__(self, path: str | Path, *, keep_answered_s: float = KEEP_ANSWERED_S) -> None:
        self.path = Path(path).expanduser()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")  # every commit is fsync'd
        self._db.execute("PRAGMA busy_timeout=5000")
        self._db.execute(_SCHEMA)
        self._db.execute(
            "DELETE FROM outcomes WHERE state <> 'pending' AND answered_at < ?",
            (time.time() - keep_answered_s,),
        )

    def close(self) -> None:
        """Close the file (pending rows stay for the next start)."""
        with self._lock:
            self._db.close()

    def write(self, outcomes: Iterable[LoggedOutcome]) -> None:
        """Log `outcomes` as pending, in one durable commit: when this returns they are on
        disk. An attempt already logged keeps its first outcome (a tool's answer is final)."""
        now = time.time()
        rows = [
            (
                o.step_id,
                o.lease_token,
                o.run_id,
                o.name,
                o.attempt,
                o.status,
                o.body,
                o.lease_expires_at,
                now,
            )
            for o in outcomes
        ]
        with self._lock, self._transaction():
            self._db.executemany(_INSERT, rows)

    def get(self, step_id: int, lease_token: int) -> LoggedOutcome | None:
        """The row of attempt ``(step_id, lease_token)``, or None."""
        with self._lock:
            cur = self._db.execute(
                f"SELECT {_COLUMNS} FROM outcomes WHERE step_id = ? AND lease_token = ?",
                (step_id, lease_token),
            )
            row = cur.fetchone()
        return None if row is None else LoggedOutcome(*row)

    def holds(self, step_id: int, lease_token: int) -> bool:
        """Whether the log has an outcome for this attempt (then it must not run again)."""
        return self.get(step_id, lease_token) is not None

    def held(self, attempts: Sequence[tuple[int, int]]) -> set[tuple[int, int]]:
        """Which of `attempts` (``(step_id, lease_token)`` pairs) the log has an outcome
        for: `holds` for a whole claim at once, one lock and one call into a thread."""
        found: set[tuple[int, int]] = set()
        with self._lock:
            for key in attempts:
                cur = self._db.execute(
                    "SELECT 1 FROM outcomes WHERE step_id = ? AND lease_token = ?", key
                )
                if cur.fetchone() is not None:
                    found.add(key)
        return found

    def pending(self, *, limit: int = 500) -> list[LoggedOutcome]:
        """Outcomes not answered yet, oldest first (at most `limit`)."""
        with self._lock:
            cur = self._db.execute(
                f"SELECT {_COLUMNS} FROM outcomes WHERE state = 'pending' "
                "ORDER BY logged_at, step_id LIMIT ?",
                (limit,),
            )
            rows = cur.fetchall()
        return [LoggedOutcome(*row) for row in rows]

    def all(self) -> list[LoggedOutcome]:
        """Every row, oldest first (for inspection and tests)."""
        with self._lock:
            rows = self._db.execute(
                f"SELECT {_COLUMNS} FROM outcomes ORDER BY logged_at, step_id"
            ).fetchall()
        return [LoggedOutcome(*row) for row in rows]

    def sent(self, keys: Iterable[tuple[int, int]]) -> None:
        """Count one more report of each attempt in `keys` (not fsync'd: a hint)."""
        now = time.time()
        with self._lock, self._transaction():
            self._db.executemany(
                "UPDATE outcomes SET sends = sends + 1, last_sent_at = ? "
                "WHERE step_id = ? AND lease_token = ?",
                [(now, s, t) for s, t in keys],
            )

    def answered(self, answers: Iterable[tuple[int, int, str, str | None, str | None]]) -> None:
        """Record the API's answers ``[(step_id, lease_token, state, reason, message)]``,
        `state` being ``recorded`` or ``refused``. Raises `ValueError` for another state."""
        now = time.time()
        rows: list[tuple[Any, ...]] = []
        for step_id, token, state, reason, message in answers:
            if state not in ("recorded", "refused"):
                raise ValueError(f"an answered outcome is recorded or refused, not {state!r}")
            rows.append((state, reason, message, now, step_id, token))
        with self._lock, self._transaction():
            self._db.executemany(
                "UPDATE outcomes SET state = ?, reason = ?, message = ?, answered_at = ? "
                "WHERE step_id = ? AND lease_token = ? AND state = 'pending'",
                rows,
            )

    def extend(self, leases: Iterable[tuple[int, int, str]]) -> None:
        """Note new lease expiries ``[(step_id, lease_token, iso)]`` of pending rows."""
        with self._lock, self._transaction():
            self._db.executemany(
                "UPDATE outcomes SET lease_expires_at = ? "
                "WHERE step_id = ? AND lease_token = ? AND state = 'pending'",
                [(iso, s, t) for s, t, iso in leases],
            )

    def _transaction(self) -> _Tx:
        return _Tx(self._db)


class _Tx:
    """BEGIN IMMEDIATE .. COMMIT (ROLLBACK on error) on an autocommit connection."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self.db = db

    def __enter__(self) -> None:
        self.db.execute("BEGIN IMMEDIATE")

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        self.db.execute("COMMIT" if exc_type is None else "ROLLBACK")
