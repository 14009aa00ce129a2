"""The audit-partitions task: the audit log's daily partitions, created ahead and dropped
past the retention (`engine.retention.maintain_audit_partitions`)."""

from __future__ import annotations

import logging

from engine import retention
from engine.config import Settings, check_interval
from engine.store import Store

logger = logging.getLogger(__name__)


class AuditPartitions:
    """Every ``PGDAG_AUDIT_UPKEEP_INTERVAL_S`` seconds (`Settings.audit_upkeep_interval_s`),
    and at once when its process takes the lead. Partitions are created ahead whatever the
    retention; days are dropped only when ``PGDAG_RETENTION_DAYS`` > 0. Raises `ConfigError`
    naming the variable for an interval that is not a finite number > 0."""

    name = "audit_partitions"
    skip_when_idle = False

    def __init__(self, settings: Settings) -> None:
        self.interval_s = check_interval(
            "PGDAG_AUDIT_UPKEEP_INTERVAL_S", settings.audit_upkeep_interval_s
        )
        self.retention_days = settings.retention_days

    async def run_once(self, store: Store) -> int:
        """One upkeep; returns partitions created, dropped and deferred plus rows moved out
        of or deleted from the DEFAULT partition (0: nothing to do). Raises psycopg's errors
        (the service records them and tries again at the next interval)."""
        upkeep = await store.maintain_audit_partitions(retention_days=self.retention_days)
        if upkeep:
            logger.info(
                "audit partition upkeep (PGDAG_RETENTION_DAYS %g): %s",
                self.retention_days,
                retention.describe(upkeep),
            )
        return (
            len(upkeep.created)
            + len(upkeep.dropped)
            + len(upkeep.deferred)
            + upkeep.moved_rows
            + upkeep.deleted_rows
        )
