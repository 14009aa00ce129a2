"""The worker's per-attempt bookkeeping, over an in-memory backend (no database): a finished
attempt leaves nothing for the cyclic garbage collector, the log keys of an attempt reach a
line its tool logs, and the deferred counts of `engine.metrics` add up once folded."""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import logging
from collections.abc import Callable, Coroutine, Sequence
from datetime import UTC, datetime
from typing import Any

from pydantic import BaseModel

from engine import logs, metrics
from engine.config import Settings
from engine.errors import PgdagError
from engine.tools import ToolContext, tool
from engine.transitions import ClaimedStep, FailOutcome, MapExpansion
from workers import worker as worker_module
from workers.worker import Worker

TOOL = "HEAP_TEST_NOOP"
LOGGED: list[dict[str, Any]] = []


class _Empty(BaseModel):
    pass


@tool(TOOL, _Empty)
async def _noop(inp: _Empty, ctx: ToolContext) -> dict[str, object]:
    return {}


class _Capture(logging.Handler):
    """Keeps the attempt keys `engine.logs` would merge into each record logged."""

    def emit(self, record: logging.LogRecord) -> None:
        context = logs._ATTEMPT.get()
        LOGGED.append(dict(context.log_context()) if context is not None else {})


class MemoryBackend:
    """Hands out `n` steps of `TOOL`, records every success; nothing else happens."""

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
                    run_id="00000000-0000-0000-0000-000000000001",
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


def _drain(n: int, *, concurrency: int = 64) -> MemoryBackend:
    async def go() -> MemoryBackend:
        backend = MemoryBackend(n)
        worker = Worker(backend, Settings.from_env(), concurrency=concurrency)  # type: ignore[arg-type]
        task = asyncio.create_task(worker.run())
        await asyncio.wait_for(backend.all_recorded.wait(), 60)
        worker.stop()
        await asyncio.wait_for(task, 60)
        return backend

    return asyncio.run(go())


def _alive(kind: type) -> int:
    return sum(1 for o in gc.get_objects() if type(o) is kind)


def test_finished_attempts_leave_no_reference_cycle() -> None:
    """With the cyclic collector off, every finished attempt is freed by reference counting
    alone. (Binding the `_Attempt` itself as the log context kept each one alive through
    attempt -> task -> context -> attempt until a full collection.)"""
    gc.collect()
    before = _alive(worker_module._Attempt)
    gc.disable()
    try:
        backend = _drain(2000)
        left = _alive(worker_module._Attempt) - before
    finally:
        gc.enable()
    assert sorted(backend.recorded) == list(range(1, 2001))
    assert left == 0, f"{left} finished attempts wait for the cyclic collector"


def test_a_tool_logs_with_its_attempt_keys(monkeypatch: Any) -> None:
    async def chatty(inp: _Empty, ctx: ToolContext) -> dict[str, object]:
        logging.getLogger("heap.tool").warning("inside %s", ctx.step_name)
        return {}

    registered = worker_module.get_tool(TOOL)
    monkeypatch.setattr(
        worker_module, "get_tool", lambda name: dataclasses.replace(registered, fn=chatty)
    )
    handler = _Capture()
    logging.getLogger("heap.tool").addHandler(handler)
    LOGGED.clear()
    try:
        _drain(3)
    finally:
        logging.getLogger("heap.tool").removeHandler(handler)
    assert sorted(LOGGED, key=lambda c: c["lease_token"]) == [
        {
            "run_id": "00000000-0000-0000-0000-000000000001",
            "step": f"s{i}",
            "attempt": 1,
            "worker": "heap-worker",
            "lease_token": 1000 + i,
        }
        for i in (1, 2, 3)
    ]


def test_deferred_counts_add_up_once_folded() -> None:
    metrics.fold()
    attempts = metrics.ATTEMPTS.value(TOOL, "succeeded")
    durations = metrics.ATTEMPT_DURATION.count(TOOL)
    waits = metrics.READY_TO_START.count(TOOL)
    _drain(300)
    metrics.fold()
    assert metrics.ATTEMPTS.value(TOOL, "succeeded") - attempts == 300
    assert metrics.ATTEMPT_DURATION.count(TOOL) - durations == 300
    assert metrics.READY_TO_START.count(TOOL) - waits == 300
    assert metrics.READY_TO_START.pending_count() == 0
    assert metrics.ATTEMPT_DURATION.pending_count() == 0
