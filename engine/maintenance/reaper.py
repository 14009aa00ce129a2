"""The reaper task: requeue (or dead-letter) running steps whose lease expired, and make
ready the delayed roots whose run's startAt has come (`transitions.reap_expired_leases`)."""

from __future__ import annotations

import logging

from engine import metrics
from engine.config import Settings, check_interval
from engine.store import Store

logger = logging.getLogger(__name__)


class Reaper:
    """Every ``PGDAG_REAPER_INTERVAL`` seconds (`Settings.reaper_interval_s`). Raises
    `ConfigError` naming the variable for an interval that is not a finite number > 0."""

    name = "reaper"
    skip_when_idle = True  # Store.maintenance_work_due has its column

    def __init__(self, settings: Settings) -> None:
        self.interval_s = check_interval("PGDAG_REAPER_INTERVAL", settings.reaper_interval_s)

    async def run_once(self, store: Store) -> int:
        """One reaper pass; returns the steps requeued, dead-lettered or made ready (0 also
        when another process's pass held the reaper's transaction lock, which only happens
        while the lead changes hands); counts the expired leases in `engine.metrics`."""
        reaped = await store.reap_detailed()
        if reaped is None:
            return 0
        metrics.count_reaped(reaped.expired)
        if reaped.total:
            logger.info(
                "reaper: %d step(s) requeued, dead-lettered, made ready, signalled or timed out",
                reaped.total,
            )
        return reaped.total
