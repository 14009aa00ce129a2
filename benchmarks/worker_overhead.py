"""The worker's own Python per attempt, with no database: ``python -m
benchmarks.worker_overhead [N]`` runs a `workers.worker.Worker` (concurrency 256) over
`MemoryBackend`, which hands out N NOOP-like steps and records every success in memory, and
prints the process CPU per attempt and what Python's cyclic collector took meanwhile (per
generation, from `gc.callbacks`). The start-up heap is frozen first, as ``python -m
workers`` does (`engine.gcpause.freeze_startup_heap`).

What W1 times is this plus psycopg, Postgres and the machine's neighbours; this part alone
moves by a few percent between runs (docs/benchmarks.md, issue 13), so compare commits by
alternating runs, or under ``valgrind --tool=callgrind`` for instruction counts.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import time
from collections.abc import Callable, Coroutine, Sequence
from datetime import UTC, datetime
from typing import Any

from pydantic import BaseModel, ConfigDict

from engine.config import Settings
from engine.errors import PgdagError
from engine.gcpause import freeze_startup_heap
from engine.tools import ToolContext, registered_tools, tool
from engine.transitions import ClaimedStep, FailOutcome, MapExpansion
from workers.worker import Worker

TOOL = "BENCH_WORKER_NOOP"
RUN_ID = "00000000-0000-0000-0000-000000000001"


class _Empty(BaseModel):
    model_config = ConfigDict(extra="forbid")


if TOOL not in registered_tools():

    @tool(TOOL, _Empty)
    async def _noop(inp: _Empty, ctx: ToolContext) -> dict[str, object]:
        """Nothing; returns ``{}``."""
        return {}


class MemoryBackend:
    """A `workers.backend.Backend` in memory: hands out `n` steps of `TOOL` (ids 1..n, one
    run, attempt 1, idempotent, fencing token 1000 + id), records every success in
    `recorded` and sets `all_recorded` after the n-th. Failing, adding steps and map
    expansion raise `AssertionError`: nothing here should do them."""

    worker_id = "heap-worker"
    transient: tuple[type[BaseException], ...] = (ConnectionError,)
    long_polls = False
    counts_attempts = True
    heartbeat_interval_s = 60.0
    max_wait_s = 0.0

    def __init__(self, n: int) -> None:
        self.n = n
        self.handed = 0
        self.recorded: list[int] = []
        self.all_recorded = asyncio.Event()

    async def register(self, *, concurrency: int, tools: Sequence[str]) -> None:
        pass

    async def claim(self, limit: int, tools: Sequence[str], *, wait_s: float) -> list[ClaimedStep]:
        steps = []
        while len(steps) < limit and self.handed < self.n:
            self.handed += 1
            steps.append(
                ClaimedStep(
                    id=self.handed,
                    run_id=RUN_ID,
                    name=f"s{self.handed}",
                    tool=TOOL,
                    input={},
                    attempt=1,
                    max_attempts=3,
                    timeout_ms=None,
                    idempotent=True,
                    lease_token=1000 + self.handed,
                    lease_expires_at=datetime.now(UTC),
                    ready_wait_s=0.002,
                )
            )
        return steps

    async def heartbeat(self, leases: list[tuple[int, int]]) -> set[int]:
        return {step_id for step_id, _ in leases}

    async def complete(self, step: ClaimedStep, output_json: str) -> None:
        self._record(step)

    async def complete_many(
        self, results: list[tuple[ClaimedStep, str]]
    ) -> dict[int, PgdagError | None]:
        for step, _ in results:
            self._record(step)
        return {step.id: None for step, _ in results}

    def _record(self, step: ClaimedStep) -> None:
        self.recorded.append(step.id)
        if len(self.recorded) >= self.n:
            self.all_recorded.set()

    async def complete_adding_steps(
        self, step: ClaimedStep, output_json: str, steps: list[dict[str, Any]]
    ) -> None:
        raise AssertionError("no step adds steps here")

    async def fail(self, step: ClaimedStep, *, error: str, retryable: bool) -> FailOutcome:
        raise AssertionError(f"no attempt fails here: {error}")

    async def expand_map(self, step: ClaimedStep, *, max_width: int) -> MapExpansion:
        raise AssertionError("no map step here")

    async def release(self, leases: list[tuple[int, int]]) -> int:
        return 0

    async def worker_heartbeat(self, *, status: str) -> None:
        pass

    async def stopped(self) -> None:
        pass

    def background(self, wake: Callable[[], None]) -> list[Coroutine[Any, Any, None]]:
        return []

    async def close(self) -> None:
        pass


def run_worker(n: int, *, concurrency: int = 256) -> MemoryBackend:
    """Run a Worker over a `MemoryBackend` of `n` steps until all are recorded, then stop
    it; returns the backend."""

    async def go() -> MemoryBackend:
        backend = MemoryBackend(n)
        worker = Worker(backend, Settings.from_env(), concurrency=concurrency)  # type: ignore[arg-type]
        task = asyncio.create_task(worker.run())
        await asyncio.wait_for(backend.all_recorded.wait(), 600)
        worker.stop()
        await asyncio.wait_for(task, 60)
        return backend

    return asyncio.run(go())


def main() -> None:
    """Print CPU microseconds per attempt and the collector's share, for N attempts."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.worker_overhead")
    parser.add_argument("n", nargs="?", type=int, default=50_000, help="attempts (50,000)")
    args = parser.parse_args()
    freeze_startup_heap()
    collections = [0, 0, 0]
    spent = [0.0, 0.0, 0.0]
    began = [0.0]

    def timed(phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            began[0] = time.perf_counter()
        else:
            collections[info["generation"]] += 1
            spent[info["generation"]] += time.perf_counter() - began[0]

    gc.callbacks.append(timed)
    cpu0 = time.process_time()
    run_worker(args.n)
    cpu = time.process_time() - cpu0
    gc.callbacks.remove(timed)
    print(f"attempts: {args.n:,}")
    print(f"cpu per attempt: {cpu / args.n * 1e6:.2f} us")
    print(
        "cyclic collector: "
        + ", ".join(f"gen{g} {collections[g]} x {spent[g] * 1000:.1f} ms" for g in range(3))
        + f" ({sum(spent) / cpu * 100:.1f} % of the cpu)"
    )


if __name__ == "__main__":
    main()
