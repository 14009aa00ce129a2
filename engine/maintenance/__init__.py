"""Maintenance: the periodic jobs one leader process runs for the whole installation.

`MaintenanceService` (service.py) elects the leader (a session advisory lock) among every
process that runs it (the API, and each ``python -m workers`` on the database; agents never:
they have no database) and runs the tasks, each a small class in a file of its own:

- `Reaper` (reaper.py): requeue expired leases, promote delayed steps;
- `Pruner` (pruner.py): delete finished runs past the retention;
- `Liveness` (liveness.py): log workers whose heartbeat stopped.

`default_tasks` builds them from the settings; a new task (audit-log partitions, when
``engine.retention`` lands) is one more class with `name`, `interval_s` and `run_once`, and
one more line there.
"""

from __future__ import annotations

from engine.config import Settings
from engine.maintenance.liveness import Liveness
from engine.maintenance.pruner import Pruner
from engine.maintenance.reaper import Reaper
from engine.maintenance.service import LeadershipLost, MaintenanceService, holder_of
from engine.maintenance.task import Task, TaskRecord

__all__ = [
    "LeadershipLost",
    "Liveness",
    "MaintenanceService",
    "Pruner",
    "Reaper",
    "Task",
    "TaskRecord",
    "default_tasks",
    "holder_of",
]


def default_tasks(settings: Settings) -> list[Task]:
    """The reaper, the pruner and the liveness check, with their intervals from `settings`.
    Raises `ConfigError` naming the variable of an interval that is not a finite number > 0.
    """
    # Hook: audit-log partition upkeep (branch ops/audit, `maintain_audit_partitions`) joins
    # here as a fourth task once it is on main.
    return [Reaper(settings), Pruner(settings), Liveness(settings)]
