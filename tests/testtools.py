"""Tools used only by tests, loaded into workers with PGDAG_TOOLS=tests.testtools."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

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


class EmitInput(BaseModel):
    model_config = ConfigDict(extra="forbid")
    value: object = None


@tool("TEST_EMIT", EmitInput)
async def emit_tool(inp: EmitInput, ctx: ToolContext) -> object:
    """Return `value` as the output (a list to map over, an object to reference)."""
    return inp.value


class EchoInput(BaseModel):
    model_config = ConfigDict(extra="allow")


@tool("TEST_ECHO", EchoInput)
async def echo_tool(inp: EchoInput, ctx: ToolContext) -> dict[str, object]:
    """Return the input it was given (after its references were resolved)."""
    return {"got": inp.model_dump(), "step": ctx.step_name}


class MapItemInput(BaseModel):
    model_config = ConfigDict(extra="forbid")
    n: int
    flaky: bool = False


@tool("TEST_MAP_ITEM", MapItemInput)
async def map_item(inp: MapItemInput, ctx: ToolContext) -> dict[str, object]:
    """Double `n`; a `flaky` element fails its first attempt (retryable)."""
    if inp.flaky and ctx.attempt == 1:
        raise ToolError(f"planned transient failure of element {inp.n}")
    return {"n": inp.n, "double": 2 * inp.n, "key": ctx.idempotency_key}


class BarrierInput(BaseModel):
    model_config = ConfigDict(extra="forbid")
    dir: str
    parties: int = Field(ge=1)


@tool("TEST_BARRIER", BarrierInput)
async def barrier(inp: BarrierInput, ctx: ToolContext) -> dict[str, object]:
    """Arrive at a barrier (a file per party in `dir`), wait until all `parties` arrived,
    then return together: siblings on different workers finish at the same instant."""
    folder = Path(inp.dir)
    await asyncio.to_thread((folder / ctx.step_name).touch)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 30
    while len(await asyncio.to_thread(lambda: list(folder.iterdir()))) < inp.parties:
        if loop.time() > deadline:
            raise ToolError("barrier: not every party arrived within 30 s")
        await asyncio.sleep(0.002)
    return {"arrived": ctx.step_name}


class UnstorableInput(BaseModel):
    model_config = ConfigDict(extra="forbid")
    kind: str
    barrier: BarrierInput | None = None


def _unstorable(kind: str) -> object:
    if kind == "lone_surrogate":
        return {"body": {"items": [0, 1, 2, {"name": "x\ud800y"}]}}
    if kind == "nan":
        return {"score": float("nan")}
    if kind == "cycle":
        looped: dict[str, object] = {"a": 1}
        looped["self"] = looped
        return looped
    if kind == "set":
        return {"tags": {1, 2}}
    raise ToolError(f"unknown kind {kind!r}", retryable=False)


@tool("TEST_UNSTORABLE_OUTPUT", UnstorableInput)
async def unstorable_output(inp: UnstorableInput, ctx: ToolContext) -> object:
    """Return an output Postgres jsonb refuses (`kind`: lone_surrogate, nan, cycle, set),
    after meeting the other steps at `barrier` when one is given."""
    if inp.barrier is not None:
        await barrier(inp.barrier, ctx)
    return _unstorable(inp.kind)


@tool("TEST_NASTY_ERROR", EmptyInput)
async def nasty_error(inp: EmptyInput, ctx: ToolContext) -> object:
    """Fail (not retryably) with an error text holding a NUL and a lone surrogate."""
    raise ToolError("bad \x00 byte and lone \udc01 surrogate", retryable=False)


# Step builders for run bodies that use these tools.


def emit(name: str, value: Any, *deps: str, **extra: Any) -> dict[str, Any]:
    """A TEST_EMIT step whose output is `value`."""
    return {
        "name": name,
        "tool": "TEST_EMIT",
        "input": {"value": value},
        "dependsOn": list(deps),
        **extra,
    }


def echo(name: str, inp: dict[str, Any], *deps: str, **extra: Any) -> dict[str, Any]:
    """A TEST_ECHO step: its output is `inp` as it ran (references resolved)."""
    return {"name": name, "tool": "TEST_ECHO", "input": inp, "dependsOn": list(deps), **extra}
