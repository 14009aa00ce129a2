"""The scheduler task: fire every due schedule (`transitions.fire_due_schedule`, one
schedule per transaction; `engine.schedules` for the fire times and the missed-fire policy).

Only the maintenance leader runs it, but a fire does not rely on that: each one locks its
schedule's row (SKIP LOCKED), and the run, the fire (unique per schedule and fire time) and
the schedule's next fire time are written in one transaction, so a leader killed in the
middle leaves nothing and a second leader cannot fire the same time again.
"""

from __future__ import annotations

import logging

from engine.config import Settings, check_interval
from engine.errors import ScheduleNotFireable
from engine.store import Store

logger = logging.getLogger(__name__)

MAX_SCHEDULES_PER_RUN = 100  # schedules fired per pass at most, so other tasks are not held


class Scheduler:
    """Every ``PGDAG_SCHEDULER_INTERVAL_S`` seconds (`Settings.scheduler_interval_s`): a
    schedule fires at most that long after its time (plus a hand-over of the lead). Runs are
    checked against ``PGDAG_MAX_STEPS`` as ``POST /runs`` checks them. Raises `ConfigError`
    naming the variable for an interval that is not a finite number > 0."""

    name = "scheduler"
    skip_when_idle = True  # Store.maintenance_work_due has its column

    def __init__(self, settings: Settings) -> None:
        self.interval_s = check_interval(
            "PGDAG_SCHEDULER_INTERVAL_S", settings.scheduler_interval_s
        )
        self.max_steps = settings.max_steps_per_run
        self.unfireable: set[str] = set()  # ids logged as not fireable, not seen fine since

    async def run_once(self, store: Store) -> int:
        """Fire the due schedules, oldest due first, up to `MAX_SCHEDULES_PER_RUN`; returns the
        fires recorded. A schedule whose fire times cannot be computed (a zone tzdata no
        longer knows) is logged once and left for the next passes; the others still fire.
        Raises psycopg's errors when Postgres fails (the service records them and tries
        again)."""
        failed: list[str] = []
        total = 0
        for _ in range(MAX_SCHEDULES_PER_RUN):
            try:
                fired = await store.fire_due_schedule(max_steps=self.max_steps, skip=failed)
            except ScheduleNotFireable as exc:
                if exc.schedule_id not in self.unfireable:  # logged once, not every pass
                    logger.error("scheduler: a due schedule cannot be fired: %s", exc)
                failed.append(exc.schedule_id)
                continue
            if fired is None:
                break
            total += len(fired.fires)
            for fire_at, run_id, created in fired.fires:
                logger.info(
                    "scheduler: schedule %s (%s) fired %s: run %s%s",
                    fired.name,
                    fired.schedule_id,
                    fire_at.isoformat(),
                    run_id,
                    "" if created or run_id is None else " (already submitted)",
                )
            if fired.missed:
                logger.warning(
                    "scheduler: schedule %s missed %d fire time(s) (policy: fire the newest "
                    "%d); next fire %s",
                    fired.name,
                    fired.missed,
                    len(fired.fires),
                    fired.next_fire_at.isoformat(),
                )
            for error in fired.errors:
                logger.error("scheduler: schedule %s: template refused: %s", fired.name, error)
        self.unfireable = set(failed)
        return total
