"""What a maintenance task is (`Task`) and what is remembered of its runs (`TaskRecord`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol

from engine.store import Store


class Task(Protocol):
    """One periodic job of the maintenance leader.

    `name` is short and stable (it labels logs, ``GET /maintenance`` and metrics);
    `interval_s` is the pause in seconds between the end of the round one run was in and the
    start of the next run
    (checked when the task is built: `engine.errors.ConfigError` naming the variable).
    `run_once` does one pass through `store` and returns how many things it did (0: nothing);
    any exception it raises is recorded and the service goes on. `skip_when_idle` True: the
    service's one read-only look before a round (`Store.maintenance_work_due`, whose query has
    a column named after the task) may say the pass has nothing to take; the run is then
    recorded (result 0) without `run_once` being called.
    """

    name: str
    interval_s: float
    skip_when_idle: bool

    async def run_once(self, store: Store) -> int:
        """One pass; returns how many rows (steps, runs, workers) it acted on."""
        ...


@dataclass
class TaskRecord:
    """What this process remembers of a task: its last run (start time, duration in
    seconds, result or error) and how many runs and failed runs it made while leading."""

    started_at: datetime | None = None
    duration_s: float | None = None
    result: int | None = None
    error: str | None = None
    runs: int = 0
    failures: int = 0
    failing_since: int = field(default=0, repr=False)  # consecutive failures (for logging)

    def as_json(self, task: Task) -> dict[str, Any]:
        """The task's entry of ``GET /maintenance`` (camelCase)."""
        last = None
        if self.started_at is not None:
            last = {
                "startedAt": self.started_at.isoformat(),
                "durationS": self.duration_s,
                "result": self.result,
                "error": self.error,
            }
        return {
            "name": task.name,
            "intervalS": task.interval_s,
            "runs": self.runs,
            "failures": self.failures,
            "lastRun": last,
        }
