"""Tools used by the chaos demo, loaded with ``PGDAG_TOOLS=chaos.tools``.

CHAOS_FLAKY fails a share of its attempts with a transient (retryable) error. The draw is
seeded by the step's idempotency key and attempt, so a given seed replays the same failures.
"""

from __future__ import annotations

import asyncio
import hashlib
import random

from pydantic import BaseModel, ConfigDict, Field

from engine.errors import ToolError
from engine.tools import ToolContext, tool


class FlakyInput(BaseModel):
    """``{"failureRate": 0..1, "ms": int, "seed": int}``: sleep `ms`, then fail with
    probability `failureRate`."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    failure_rate: float = Field(ge=0, le=1, alias="failureRate")
    ms: int = Field(default=0, ge=0, le=60_000)
    seed: int = 0


@tool("CHAOS_FLAKY", FlakyInput)
async def flaky(inp: FlakyInput, ctx: ToolContext) -> dict[str, object]:
    """Sleep `ms` ms, then fail transiently with probability `failureRate`."""
    digest = hashlib.sha256(f"{inp.seed}:{ctx.idempotency_key}:{ctx.attempt}".encode()).digest()
    draw = random.Random(digest).random()
    await asyncio.sleep(inp.ms / 1000)
    if draw < inp.failure_rate:
        raise ToolError(f"transient failure injected (draw {draw:.2f} < {inp.failure_rate})")
    return {"ok": True, "attempt": ctx.attempt, "tookMs": inp.ms}


class PlanInput(BaseModel):
    """``{"width": int, "failureRate": 0..1, "ms": int, "seed": int}``: the plan's shape."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    width: int = Field(ge=1, le=50)
    failure_rate: float = Field(default=0, ge=0, le=1, alias="failureRate")
    ms: int = Field(default=0, ge=0, le=60_000)
    seed: int = 0


@tool("CHAOS_PLAN", PlanInput)
async def plan(inp: PlanInput, ctx: ToolContext) -> dict[str, object]:
    """A planning step (issue 15 part 5): after `ms` ms, add `width` CHAOS_FLAKY steps
    ``<name>.<i>`` that depend on it, and a DELAY ``<name>.join`` that reads each one's
    output by ``$ref``; they are inserted with this step's success, all or none."""
    await asyncio.sleep(inp.ms / 1000)
    work = [f"{ctx.step_name}.{i}" for i in range(inp.width)]
    ctx.add_steps(
        [
            {
                "name": name,
                "tool": "CHAOS_FLAKY",
                "input": {"failureRate": inp.failure_rate, "ms": 100, "seed": inp.seed},
                "dependsOn": [ctx.step_name],
                "maxAttempts": 15,
            }
            for name in work
        ]
        + [
            {
                "name": f"{ctx.step_name}.join",
                "tool": "DELAY",
                "input": {"ms": {"$ref": f"steps.{work[0]}.output.tookMs"}},
                "dependsOn": work,
                "maxAttempts": 15,
            }
        ]
    )
    return {"planned": [*work, f"{ctx.step_name}.join"]}
