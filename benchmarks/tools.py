"""Tools for the benchmarks (workers load them with ``PGDAG_TOOLS=benchmarks.tools``).

- ``NOOP``: does nothing; returns ``{}``. The unit of work of the throughput workloads.
- ``STAMP``: returns ``{"startedNs": time.time_ns()}``, the wall-clock time at which the
  tool began; the pickup-latency workload compares it with the submit's commit time.
"""

from __future__ import annotations

import time

from pydantic import BaseModel, ConfigDict

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
