"""The liveness task: workers whose heartbeat stopped without their saying so.

A worker (or agent) is *live* while it is not stopped and its last heartbeat is younger than
the lease TTL (``GET /workers`` shows ``alive``; a run's ``waitingFor: noLiveWorker`` and the
tool check of ``POST /runs`` read the same rule). The ``workers`` table has no "dead" state
(``status`` is running, stopping or stopped, and only the worker itself says stopped: an
agent whose row says stopped is refused until it registers again), so this task does not
write: it finds the silent ones and logs each once, when it goes silent and when it is seen
again, so an operator learns that a worker vanished before its leases are reaped.
"""

from __future__ import annotations

import logging

from engine.config import Settings, check_interval
from engine.store import Store

logger = logging.getLogger(__name__)


class Liveness:
    """Every ``PGDAG_LIVENESS_INTERVAL_S`` seconds (`Settings.liveness_interval_s`); silent
    means no heartbeat for longer than the lease TTL (``PGDAG_LEASE_TTL``). Raises
    `ConfigError` naming the variable for an interval that is not a finite number > 0."""

    name = "liveness"
    skip_when_idle = False

    def __init__(self, settings: Settings) -> None:
        self.interval_s = check_interval("PGDAG_LIVENESS_INTERVAL_S", settings.liveness_interval_s)
        self.limit_s = settings.lease_ttl_s
        self.silent: set[str] = set()  # ids logged as silent and not seen since

    async def run_once(self, store: Store) -> int:
        """Find the silent workers, log the newly silent and the ones back; returns how many
        are silent now."""
        rows = await store.stale_workers(limit_s=self.limit_s)
        now_silent = {r["id"] for r in rows}
        for r in rows:
            if r["id"] not in self.silent:
                logger.warning(
                    "liveness: %s worker %s (%s, pid %s) silent for %.0fs (lease TTL %gs); "
                    "its leases will be reaped as they expire",
                    r["kind"],
                    r["id"],
                    r["hostname"],
                    r["pid"],
                    r["silent_s"],
                    self.limit_s,
                )
        for worker_id in sorted(self.silent - now_silent):
            logger.info("liveness: worker %s is heartbeating again or stopped", worker_id)
        self.silent = now_silent
        return len(now_silent)
