"""Drivers for the peers `python -m benchmarks` measures pgdag against: PgQueuer,
Procrastinate and DBOS, each driven through its own public API with the throughput settings
its docs recommend (see each module's docstring and ``CONFIG``).

``PEERS[name]`` is a module with ``VERSION``, ``CONFIG``, ``available()``,
``w1(dsn, jobs, processes=2)`` and ``w3(dsn, jobs, rate_per_s)``; the DBOS one also has
``w2(dsn, workflows, processes=2)``. Each call installs the peer's schema in the empty
database `dsn` (a libpq URL or ``key=value`` string), starts and always stops its own
worker processes, and raises `PeerBenchError` with the worker's stderr when a worker dies
or the call overruns `CALL_BUDGET_S`. Procrastinate and DBOS drain too slowly for 20,000
jobs to fit that budget, so their ``w1`` runs at most ``W1_MAX_JOBS`` and then reports
``requestedJobs`` beside ``jobs``. Importing this package does not import the peers:
``available()`` says whether one is installed (CI installs only ``.[dev]``).
"""

from __future__ import annotations

from types import ModuleType

from benchmarks.peers import dbos_bench, pgqueuer_bench, procrastinate_bench
from benchmarks.peers._common import CALL_BUDGET_S, PeerBenchError

PEERS: dict[str, ModuleType] = {
    "pgqueuer": pgqueuer_bench,
    "procrastinate": procrastinate_bench,
    "dbos": dbos_bench,
}

__all__ = ["CALL_BUDGET_S", "PEERS", "PeerBenchError"]
