"""The child-runs task: steps of kind run (``"run": {template}``) start and end here.

Each pass, on the maintenance leader (one process at a time):

1. `Store.start_child_runs`: every due ready step of kind run gets its child run, inserted in
   the transaction that claims the step (`engine.transitions.start_child_runs`);
2. `Store.finish_child_runs`: every such step whose child run has ended succeeds or fails
   with the child's outcome (`engine.transitions.finish_child_runs`).

No worker slot is held while a child runs. A step of kind run starts at most one pass
(``PGDAG_REAPER_INTERVAL``, 1 s by default) after it became ready, and ends at most one pass
after its child ended.
"""

from __future__ import annotations

import logging

from engine.config import Settings, check_interval
from engine.store import Store

logger = logging.getLogger(__name__)

BATCH_DEFAULT = 100  # steps started, and steps ended, per pass at most


class ChildRuns:
    """Every ``PGDAG_REAPER_INTERVAL`` seconds (`Settings.reaper_interval_s`). Raises
    `ConfigError` naming the variable for an interval that is not a finite number > 0."""

    name = "child_runs"
    skip_when_idle = True  # Store.maintenance_work_due has its column

    def __init__(self, settings: Settings, *, batch: int = BATCH_DEFAULT) -> None:
        self.interval_s = check_interval("PGDAG_REAPER_INTERVAL", settings.reaper_interval_s)
        self.settings = settings
        self.batch = batch

    async def run_once(self, store: Store) -> int:
        """One pass: start the due child runs, then end the steps whose child ended;
        returns how many steps it started or ended."""
        s = self.settings
        started = await store.start_child_runs(
            limit=self.batch,
            max_steps=s.max_steps_per_run,
            backoff_base_ms=s.backoff_base_ms,
            backoff_cap_ms=s.backoff_cap_ms,
        )
        ended = await store.finish_child_runs(
            limit=self.batch,
            backoff_base_ms=s.backoff_base_ms,
            backoff_cap_ms=s.backoff_cap_ms,
            max_output_bytes=s.max_output_bytes,
        )
        if started or ended:
            logger.info("child runs: %d step(s) started a child, %d ended with one", started, ended)
        return started + ended
