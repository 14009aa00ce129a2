"""The pruner task: delete runs that finished more than ``PGDAG_RETENTION_DAYS`` ago, with
their steps, edges and audit rows (`transitions.prune_finished_runs`)."""

from __future__ import annotations

import logging

from engine.config import Settings, check_interval
from engine.store import Store

logger = logging.getLogger(__name__)

BATCH_RUNS = 100  # runs deleted per transaction
MAX_BATCHES_PER_RUN = 20  # at most 2,000 runs per pass, so the reaper is never held long


class Pruner:
    """Every ``PGDAG_PRUNE_INTERVAL_S`` seconds (`Settings.prune_interval_s`); does nothing
    when ``PGDAG_RETENTION_DAYS`` is 0 (keep everything). Raises `ConfigError` naming the
    variable for an interval that is not a finite number > 0."""

    name = "pruner"
    skip_when_idle = False

    def __init__(self, settings: Settings) -> None:
        self.interval_s = check_interval("PGDAG_PRUNE_INTERVAL_S", settings.prune_interval_s)
        self.retention_days = settings.retention_days

    async def run_once(self, store: Store) -> int:
        """Delete finished runs past the retention, `BATCH_RUNS` per transaction, up to
        `MAX_BATCHES_PER_RUN` batches; returns the runs deleted."""
        if self.retention_days <= 0:
            return 0
        retention_s = self.retention_days * 86400
        total = 0
        for _ in range(MAX_BATCHES_PER_RUN):
            n = await store.prune(retention_s=retention_s, limit=BATCH_RUNS)
            total += n
            if n < BATCH_RUNS:
                break
        if total:
            logger.info(
                "pruner: deleted %d run(s) finished over %g day(s) ago (PGDAG_RETENTION_DAYS)",
                total,
                self.retention_days,
            )
        return total
