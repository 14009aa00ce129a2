"""DELAY: sleep for `ms` milliseconds and report how long it took."""

from __future__ import annotations

import asyncio
import time

from pydantic import BaseModel, ConfigDict, Field

from engine.tools import ToolContext, tool


class DelayInput(BaseModel):
    """DELAY input: ``{"ms": int >= 0}``."""

    model_config = ConfigDict(extra="forbid", strict=True)
    ms: int = Field(ge=0, le=24 * 3600 * 1000)


@tool("DELAY", DelayInput)
async def delay(inp: DelayInput, ctx: ToolContext) -> dict[str, object]:
    """Wait `inp.ms` ms; returns ``{"ok": true, "tookMs": int}``."""
    started = time.monotonic()
    await asyncio.sleep(inp.ms / 1000)
    return {"ok": True, "tookMs": round((time.monotonic() - started) * 1000)}
