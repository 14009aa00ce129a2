"""What a worker needs from the system that hands it steps: the `Backend` protocol.

`workers.worker.Worker` is one loop (claim, run tools, heartbeat, group-commit results,
graceful shutdown) over a backend; two implement it:

- `workers.database.DatabaseBackend`: Postgres through `engine.store.Store`, woken by
  ``LISTEN pgdag_ready``, a candidate for the maintenance lead (``python -m workers``);
- `workers.agent.AgentBackend`: the API's agent protocol over HTTP (``POST /agent/*``),
  with the local idempotency log (``python -m workers --server URL``).

Both go through the same fenced transitions: a database backend calls them, an agent
backend asks the API to call them. Errors a backend raises: `transient` ones (the Worker
retries later: a connection lost, an API not answering), `LeaseLost` when a token is no
longer current, `OutputRefused` for an output the database refused, and any other
`PgdagError` for what retrying cannot fix (the worker then stops, exit code 2).
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine, Sequence
from typing import Any, Protocol

from engine.errors import PgdagError
from engine.transitions import ClaimedStep, FailOutcome, MapExpansion


class Backend(Protocol):
    """The operations of one worker process, bound to its `worker_id`."""

    worker_id: str
    # Errors meaning "not now": the Worker logs them and tries again later.
    transient: tuple[type[BaseException], ...]
    # True when `claim` itself waits (up to `wait_s`) for work to become ready, so the
    # Worker claims again at once after an empty answer instead of sleeping.
    long_polls: bool
    # True when the Worker counts its attempts in `engine.metrics` (a database worker);
    # False when another process does (the API counts an agent's reports), so that summing
    # the counters over every process's /metrics counts each attempt once.
    counts_attempts: bool

    @property
    def heartbeat_interval_s(self) -> float:
        """Seconds between two lease heartbeats (known after `register`)."""
        ...

    @property
    def max_wait_s(self) -> float:
        """The longest `wait_s` a `claim` may be given, in seconds (0: no waiting)."""
        ...

    async def register(self, *, concurrency: int, tools: Sequence[str]) -> None:
        """Announce this worker (its workers row); a backend may also finish what an
        earlier run of it left (the agent reports its logged outcomes here, before any
        claim). Raises a `transient` error to be retried."""
        ...

    async def claim(self, limit: int, tools: Sequence[str], *, wait_s: float) -> list[ClaimedStep]:
        """Claim up to `limit` ready steps of `tools`; a long-polling backend waits up to
        `wait_s` seconds for one to become ready."""
        ...

    async def heartbeat(self, leases: list[tuple[int, int]]) -> set[int]:
        """Extend leases ``[(step_id, token)]``; returns the step ids still held."""
        ...

    async def complete(self, step: ClaimedStep, output_json: str) -> None:
        """Record one success at once; raises `LeaseLost` or `OutputRefused`."""
        ...

    async def complete_many(
        self, results: list[tuple[ClaimedStep, str]]
    ) -> dict[int, PgdagError | None]:
        """Record a batch of successes ``[(step, output_json_text)]`` (the group commit);
        per step id: None (recorded), `LeaseLost` or `OutputRefused`."""
        ...

    async def complete_adding_steps(
        self, step: ClaimedStep, output_json: str, steps: list[dict[str, Any]]
    ) -> None:
        """Record one success together with the steps its tool added to the run
        (`engine.tools.ToolContext.add_steps`), all or nothing; raises `LeaseLost`, or
        `StepsRefused` (an `OutputRefused`: the attempt was failed for good)."""
        ...

    async def fail(self, step: ClaimedStep, *, error: str, retryable: bool) -> FailOutcome:
        """Record a failed attempt (retry later or dead letter); raises `LeaseLost`."""
        ...

    async def expand_map(self, step: ClaimedStep, *, max_width: int) -> MapExpansion:
        """Expand a claimed map step (database workers only: the API does it for agents)."""
        ...

    async def release(self, leases: list[tuple[int, int]]) -> int:
        """Hand back unfinished attempts on shutdown; returns how many were released."""
        ...

    async def worker_heartbeat(self, *, status: str) -> None:
        """Refresh this worker's row (``running`` or ``stopping``)."""
        ...

    async def stopped(self) -> None:
        """Mark this worker's row stopped (best effort, at the very end)."""
        ...

    def background(self, wake: Callable[[], None]) -> list[Coroutine[Any, Any, None]]:
        """The backend's own loops, run while the worker runs and cancelled at its end;
        each calls `wake` when there may be work to claim."""
        ...

    async def close(self) -> None:
        """Free what the backend holds (connections, files)."""
        ...
