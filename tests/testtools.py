"""Tools used only by tests, loaded into workers with PGDAG_TOOLS=tests.testtools."""

from __future__ import annotations

import asyncio
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from engine.errors import ToolError
from engine.tools import ToolContext, tool


class FailTimesInput(BaseModel):
    model_config = ConfigDict(extra="forbid")
    fail_times: int = Field(ge=0, alias="failTimes")
    retryable: bool = True


@tool("TEST_FAIL_TIMES", FailTimesInput)
async def fail_times(inp: FailTimesInput, ctx: ToolContext) -> dict[str, object]:
    """Fail the first `failTimes` attempts, then succeed with the attempt number."""
    if ctx.attempt <= inp.fail_times:
        raise ToolError(f"planned failure {ctx.attempt}/{inp.fail_times}", retryable=inp.retryable)
    return {"attempt": ctx.attempt}


class EmptyInput(BaseModel):
    model_config = ConfigDict(extra="forbid")


@tool("TEST_NUL_OUTPUT", EmptyInput)
async def nul_output(inp: EmptyInput, ctx: ToolContext) -> dict[str, object]:
    """Return a string with a NUL character, which jsonb refuses."""
    return {"text": "before\x00after"}


@tool("TEST_DEEP_OUTPUT", EmptyInput)
async def deep_output(inp: EmptyInput, ctx: ToolContext) -> object:
    """Return a list nested 100,000 deep, which json.dumps cannot serialise."""
    value: list[object] = []
    for _ in range(100_000):
        value = [value]
    return value


class FailUntilFileInput(BaseModel):
    model_config = ConfigDict(extra="forbid")
    path: str


@tool("TEST_FAIL_UNTIL_FILE", FailUntilFileInput)
async def fail_until_file(inp: FailUntilFileInput, ctx: ToolContext) -> dict[str, object]:
    """Fail (retryably) until the file at `path` exists: a cause a person can fix."""
    if not await asyncio.to_thread(Path(inp.path).exists):
        raise ToolError(f"{inp.path} does not exist yet")
    return {"attempt": ctx.attempt}
