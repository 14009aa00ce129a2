"""The worker's per-attempt bookkeeping, over an in-memory backend (no database,
`benchmarks.worker_overhead.MemoryBackend`): a finished attempt leaves nothing for the cyclic
garbage collector, the log keys of an attempt reach a line its tool logs, and the deferred
counts of `engine.metrics` add up once folded."""

from __future__ import annotations

import dataclasses
import gc
import logging
from typing import Any

from benchmarks.worker_overhead import RUN_ID, TOOL, MemoryBackend, run_worker
from engine import logs, metrics
from engine.tools import ToolContext
from workers import worker as worker_module

LOGGED: list[dict[str, Any]] = []


class _Capture(logging.Handler):
    """Keeps the attempt keys `engine.logs` would merge into each record logged."""

    def emit(self, record: logging.LogRecord) -> None:
        context = logs._ATTEMPT.get()
        LOGGED.append(dict(context.log_context()) if context is not None else {})


def _drain(n: int) -> MemoryBackend:
    return run_worker(n, concurrency=64)


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
    async def chatty(inp: Any, ctx: ToolContext) -> dict[str, object]:
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
            "run_id": RUN_ID,
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
