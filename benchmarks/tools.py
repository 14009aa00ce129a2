"""Tools for the benchmarks (workers load them with ``PGDAG_TOOLS=benchmarks.tools``).

- ``NOOP``: does nothing; returns ``{}``. The unit of work of the throughput workloads.
- ``STAMP``: returns ``{"startedNs": time.time_ns()}``, the wall-clock time at which the
  tool began; the pickup-latency workload compares it with the submit's commit time.
- ``BENCH_EMIT_LIST``: input ``{"n": 0..100000}``; returns ``{"items": [0, 1, ..., n-1]}``,
  the source list of the map fan-out workload (W8).
"""

from __future__ import annotations

import time

from pydantic import BaseModel, ConfigDict, Field

from engine.tools import ToolContext, tool


class Empty(BaseModel):
    """Input ``{}``."""

    model_config = ConfigDict(extra="forbid")


@tool("NOOP", Empty)
async def noop(inp: Empty, ctx: ToolContext) -> dict[str, object]:
    """Nothing; returns ``{}``."""
    return {}


@tool("STAMP", Empty)
async def stamp(inp: Empty, ctx: ToolContext) -> dict[str, object]:
    """Returns ``{"startedNs": <time.time_ns() when the tool started>}``."""
    return {"startedNs": time.time_ns()}


class EmitListInput(BaseModel):
    """Input ``{"n": <0..100000>}``."""

    model_config = ConfigDict(extra="forbid")

    n: int = Field(ge=0, le=100_000)


@tool("BENCH_EMIT_LIST", EmitListInput)
async def emit_list(inp: EmitListInput, ctx: ToolContext) -> dict[str, object]:
    """Returns ``{"items": [0, 1, ..., n-1]}``."""
    return {"items": list(range(inp.n))}
