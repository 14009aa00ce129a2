"""Maintenance: the periodic jobs one leader process runs for the whole installation.

`MaintenanceService` (service.py) elects the leader (a session advisory lock) among every
process that runs it (the API, and each ``python -m workers`` on the database; agents never:
they have no database) and runs the tasks, each a small class in a file of its own:

- `Reaper` (reaper.py): requeue expired leases, promote delayed steps;
- `Pruner` (pruner.py): delete finished runs past the retention;
- `AuditPartitions` (audit.py): the audit log's daily partitions (`engine.retention`);
- `Liveness` (liveness.py): log workers whose heartbeat stopped;
- `ChildRuns` (child_runs.py): start and end the child runs of steps of kind run.

`default_tasks` builds them from the settings; a new task is one more class with `name`,
`interval_s` and `run_once`, and one more line there.
"""

from __future__ import annotations

from engine.config import Settings
from engine.maintenance.audit import AuditPartitions
from engine.maintenance.child_runs import ChildRuns
from engine.maintenance.liveness import Liveness
from engine.maintenance.pruner import Pruner
from engine.maintenance.reaper import Reaper
from engine.maintenance.service import LeadershipLost, MaintenanceService, holder_of
from engine.maintenance.task import Task, TaskRecord

__all__ = [
    "AuditPartitions",
    "ChildRuns",
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
    """The reaper, the pruner, the audit-log partitions, the liveness check and the child
    runs, with their intervals from `settings`. Raises `ConfigError` naming the variable of
    an interval that is not a finite number > 0."""
    return [
        Reaper(settings),
        Pruner(settings),
        AuditPartitions(settings),
        Liveness(settings),
        ChildRuns(settings),
    ]
