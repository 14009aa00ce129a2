"""Retention of the audit log: daily partitions created ahead, old ones dropped whole.

``audit_log`` is partitioned by UTC day (migration 0007): ``audit_log_pYYYYMMDD`` holds the
rows whose ``created_at`` falls on that day, ``audit_log_default`` catches a row whose day
has no partition yet. `maintain_audit_partitions` is the whole upkeep, one call:

- create today's partition and the next `ahead_days` days' (and the day of any row that
  landed in DEFAULT, moving those rows in);
- drop every partition whose upper bound is older than ``now() - retention_days``: every
  row in it is older than the retention, so a partition with one young row is kept;
- delete DEFAULT's rows older than the retention (DEFAULT is a safety net, normally empty).

Dropping a partition costs the same for 10 rows as for 10 million and leaves no dead tuples,
where the old ``DELETE`` of a pruned run's audit rows left one per event for vacuum.
A finished run is still deleted by ``prune_finished_runs`` (engine/transitions.py) when it
finished more than the retention ago; its audit rows, all older than its finish, are gone
with their partition at the first upkeep after their day ends past the retention, so they
outlive the run by at most a day. Events of a run still kept (a long run, or one retried by
hand) are dropped by their own age, like every other event.

Upkeep is serialized between processes by an advisory lock (a process that finds it taken
skips its pass: the holder does the work), and every ``CREATE``/``DROP`` (which needs an
``ACCESS EXCLUSIVE`` lock on ``audit_log`` for an instant) waits at most `lock_timeout_s`
so a long reader never queues every writer behind the DDL: a partition whose lock was not
granted is reported ``deferred``, with the rest of that pass, and handled at the next call.

The maintenance leader calls it (`engine.maintenance.AuditPartitions`, task
``audit_partitions``): as it takes the lead, then every ``PGDAG_AUDIT_UPKEEP_INTERVAL_S``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import psycopg
from psycopg.rows import DictRow

from engine.sql import queries

logger = logging.getLogger(__name__)

Conn = psycopg.AsyncConnection[DictRow]

AHEAD_DAYS_DEFAULT = 7  # days of partitions created ahead of today (UTC)
LOCK_TIMEOUT_S_DEFAULT = 2.0  # longest wait of one CREATE/DROP for its lock on audit_log


@dataclass(frozen=True)
class AuditUpkeep:
    """What one `maintain_audit_partitions` call did. Names are partition names."""

    created: tuple[str, ...] = ()
    dropped: tuple[str, ...] = ()
    deferred: tuple[str, ...] = ()  # lock not granted within the timeout: next call
    moved_rows: int = 0  # rows moved from DEFAULT into the partitions created
    deleted_rows: int = 0  # rows of DEFAULT deleted for being older than the retention
    busy: bool = False  # another process's upkeep held the lock: it does the work

    def __bool__(self) -> bool:
        """True when the call did (or deferred) anything."""
        return bool(self.created or self.dropped or self.deferred or self.deleted_rows)


async def maintain_audit_partitions(
    conn: Conn,
    *,
    retention_days: float | None,
    ahead_days: int = AHEAD_DAYS_DEFAULT,
    lock_timeout_s: float = LOCK_TIMEOUT_S_DEFAULT,
) -> AuditUpkeep:
    """Create the audit_log partitions of today and the next `ahead_days` days (UTC), and
    drop those whose every row is older than `retention_days` days (``None`` or ``<= 0``:
    keep everything). Idempotent and safe to call from several processes at once: one holds
    an advisory lock, a call that finds it taken returns at once with ``busy`` set (the
    holder does the work), a later one finds nothing left to do. Each CREATE/DROP waits at
    most `lock_timeout_s` seconds for its lock on audit_log; after one times out, the rest
    of the pass is reported ``deferred`` without waiting again. Runs in its own transaction
    on `conn`, which must not be inside one.

    Raises `ValueError` for a negative `ahead_days` or a `lock_timeout_s` not above 0, and
    psycopg's errors when Postgres fails (the caller's loop retries at its next pass).
    """
    if ahead_days < 0:
        raise ValueError(f"ahead_days must be >= 0, got {ahead_days}")
    if lock_timeout_s <= 0:
        raise ValueError(f"lock_timeout_s must be > 0, got {lock_timeout_s}")
    retention_s = retention_days * 86400 if retention_days and retention_days > 0 else None
    async with conn.transaction():
        cur = await conn.execute(
            queries["maintain_audit_partitions"],
            {
                "retention_s": retention_s,
                "ahead_days": ahead_days,
                "lock_timeout_ms": max(1, round(lock_timeout_s * 1000)),
            },
        )
        rows = await cur.fetchall()
    done: dict[str, list[str]] = {"created": [], "dropped": [], "deferred": []}
    moved = deleted = 0
    if any(r["action"] == "busy" for r in rows):
        return AuditUpkeep(busy=True)
    for r in rows:
        if r["action"] == "deleted":
            deleted += int(r["n_rows"])
            continue
        done[r["action"]].append(r["partition_name"])
        if r["action"] == "created":
            moved += int(r["n_rows"] or 0)
    return AuditUpkeep(
        created=tuple(done["created"]),
        dropped=tuple(done["dropped"]),
        deferred=tuple(done["deferred"]),
        moved_rows=moved,
        deleted_rows=deleted,
    )


def describe(upkeep: AuditUpkeep) -> str:
    """One log line's worth of `upkeep`, e.g. ``created 1, dropped 2 (audit_log_p20261101,
    ...)``."""
    parts = []
    for label, names in (
        ("created", upkeep.created),
        ("dropped", upkeep.dropped),
        ("deferred", upkeep.deferred),
    ):
        if names:
            parts.append(f"{label} {len(names)} ({', '.join(names)})")
    if upkeep.moved_rows:
        parts.append(f"moved {upkeep.moved_rows} row(s) out of audit_log_default")
    if upkeep.deleted_rows:
        parts.append(f"deleted {upkeep.deleted_rows} old row(s) of audit_log_default")
    return "; ".join(parts) or "nothing to do"


async def list_partitions(conn: psycopg.AsyncConnection[DictRow]) -> list[DictRow]:
    """The audit log's partitions, oldest first: ``partition_name``, ``lower_bound`` and
    ``upper_bound`` (timestamptz; None for the DEFAULT partition), ``rows_estimate`` (from
    the statistics, never a count) and ``total_bytes``. For operators and tests: what the
    upkeep created and what it will drop next."""
    cur = await conn.execute(queries["list_audit_partitions"])
    return await cur.fetchall()
