"""`DatabaseBackend`: a worker that holds a ``DATABASE_URL`` (``python -m workers``).

Every operation is an `engine.store.Store` method (the worker contains no SQL). Besides
them it runs two loops of its own while the worker runs:

- listener: the dedicated ``LISTEN pgdag_ready`` connection, reconnected after any failure
  with capped exponential backoff; each notification wakes the claim loop;
- maintenance: this process stands for the maintenance lead (`engine.maintenance`: the
  reaper, the pruner, the audit log's daily partitions, the liveness check; one leader
  across the API and every database worker) and runs the tasks while it leads.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Callable, Coroutine, Sequence
from typing import Any

from engine.config import Settings
from engine.db import RETRYABLE
from engine.errors import PgdagError
from engine.maintenance import MaintenanceService, default_tasks
from engine.ready import listen_for_ready
from engine.store import Store
from engine.transitions import ClaimedStep, FailOutcome, MapExpansion

logger = logging.getLogger(__name__)


class DatabaseBackend:
    """The `workers.backend.Backend` of a worker on Postgres: `store` for every operation,
    `database_url` for the LISTEN connection, `settings` for the lease TTL, the failure
    backoff and the maintenance intervals. `restarts` and `last_exit_code` come from the
    supervisor (PGDAG_RESTARTS, PGDAG_LAST_EXIT_CODE) and go to the workers row. Raises
    `ConfigError` naming the variable of a maintenance interval that is not a finite number
    > 0."""

    transient: tuple[type[BaseException], ...] = RETRYABLE
    long_polls = False
    counts_attempts = True

    def __init__(
        self,
        store: Store,
        settings: Settings,
        *,
        database_url: str,
        worker_id: str,
        restarts: int = 0,
        last_exit_code: int | None = None,
    ) -> None:
        self.store = store
        self.settings = settings
        self.database_url = database_url
        self.worker_id = worker_id
        self.restarts = restarts
        self.last_exit_code = last_exit_code
        self._wake: Callable[[], None] | None = None
        # Built here so that bad intervals end start-up (ConfigError naming the variable).
        self.maintenance = MaintenanceService(
            database_url,
            store,
            settings,
            default_tasks(settings),
            holder=f"worker {worker_id}",
            on_result=self._after_maintenance,
        )

    @property
    def heartbeat_interval_s(self) -> float:
        """A third of the lease TTL, in seconds."""
        return self.settings.lease_ttl_s / 3

    @property
    def max_wait_s(self) -> float:
        """0: a database claim never waits (LISTEN wakes the worker instead)."""
        return 0.0

    async def register(self, *, concurrency: int, tools: Sequence[str]) -> None:
        """Insert or refresh the workers row (kind ``database``)."""
        await self.store.register_worker(
            self.worker_id,
            hostname=socket.gethostname(),
            pid=os.getpid(),
            concurrency=concurrency,
            tools=list(tools),
            restarts=self.restarts,
            last_exit_code=self.last_exit_code,
        )

    async def claim(self, limit: int, tools: Sequence[str], *, wait_s: float) -> list[ClaimedStep]:
        """`Store.claim`; returns at once (`wait_s` is ignored)."""
        del wait_s  # LISTEN wakes a database worker instead
        return await self.store.claim(self.worker_id, limit, tools=tools)

    async def heartbeat(self, leases: list[tuple[int, int]]) -> set[int]:
        """`Store.heartbeat`."""
        return await self.store.heartbeat(leases, owner=self.worker_id)

    async def complete(self, step: ClaimedStep, output_json: str) -> None:
        """`Store.complete`: raises `LeaseLost` or `OutputRefused`."""
        await self.store.complete(step, output_json, worker_id=self.worker_id)

    async def complete_many(
        self, results: list[tuple[ClaimedStep, str]]
    ) -> dict[int, PgdagError | None]:
        """`Store.complete_many` in one statement."""
        return await self.store.complete_many(
            [(step.id, step.lease_token, text) for step, text in results],
            worker_id=self.worker_id,
            may_skip=any(step.may_skip_children for step, _ in results),
        )

    async def complete_adding_steps(
        self, step: ClaimedStep, output_json: str, steps: list[dict[str, Any]]
    ) -> None:
        """`Store.complete_adding_steps` with the settings' step limit; raises `LeaseLost`
        or `StepsRefused`."""
        await self.store.complete_adding_steps(
            step.id,
            step.lease_token,
            output_json,
            steps,
            worker_id=self.worker_id,
            max_steps=self.settings.max_steps_per_run,
        )

    async def fail(self, step: ClaimedStep, *, error: str, retryable: bool) -> FailOutcome:
        """`Store.fail` with the settings' backoff; raises `LeaseLost`."""
        return await self.store.fail(
            step,
            error=error,
            retryable=retryable,
            worker_id=self.worker_id,
            backoff_base_ms=self.settings.backoff_base_ms,
            backoff_cap_ms=self.settings.backoff_cap_ms,
        )

    async def expand_map(self, step: ClaimedStep, *, max_width: int) -> MapExpansion:
        """`Store.expand_map`; raises `LeaseLost`."""
        return await self.store.expand_map(step, worker_id=self.worker_id, max_width=max_width)

    async def release(self, leases: list[tuple[int, int]]) -> int:
        """`Store.release`."""
        return await self.store.release(leases, worker_id=self.worker_id)

    async def worker_heartbeat(self, *, status: str) -> None:
        """`Store.worker_heartbeat`."""
        await self.store.worker_heartbeat(self.worker_id, status=status)

    async def stopped(self) -> None:
        """`Store.worker_stopped`."""
        await self.store.worker_stopped(self.worker_id)

    def background(self, wake: Callable[[], None]) -> list[Coroutine[Any, Any, None]]:
        """The listener and the maintenance service (leader or standby)."""
        self._wake = wake
        return [self.listen_loop(wake), self.maintenance.run()]

    def _after_maintenance(self, task: str, n: int) -> None:
        """Wake the claim loop after the reaper made `n` > 0 steps ready (or dead)."""
        if task == "reaper" and n > 0 and self._wake is not None:
            self._wake()

    async def close(self) -> None:
        """Nothing: the pool belongs to whoever opened it."""

    # --- loops --------------------------------------------------------------------------

    async def listen_loop(self, wake: Callable[[], None]) -> None:
        """LISTEN for ready steps and `wake` on each (`engine.ready.listen_for_ready`:
        reconnected with backoff, polling keeps claiming meanwhile)."""

        async def notified() -> None:
            wake()

        await listen_for_ready(
            self.database_url, notified, label="listener", meanwhile="polling meanwhile"
        )
