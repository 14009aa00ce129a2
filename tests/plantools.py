"""A planning tool for the tests of steps a run adds to itself (issue 15 part 5)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict

from engine.errors import ToolError
from engine.tools import ToolContext, tool


class PlanInput(BaseModel):
    model_config = ConfigDict(extra="forbid")
    steps: list[dict[str, Any]]
    # A file to wait for before planning (a test holds the step here, or kills its worker).
    gate: str | None = None
    value: Any = None


@tool("TEST_PLAN", PlanInput)
async def plan(inp: PlanInput, ctx: ToolContext) -> dict[str, object]:
    """Add `steps` to the run (`ToolContext.add_steps`) and return `value` with their names,
    once `gate` exists when one is given."""
    if inp.gate is not None:
        deadline = asyncio.get_running_loop().time() + 30
        while not await asyncio.to_thread(Path(inp.gate).exists):
            if asyncio.get_running_loop().time() > deadline:
                raise ToolError(f"gate {inp.gate} never opened")
            await asyncio.sleep(0.01)
    ctx.add_steps(_unescape(inp.steps))
    return {"value": inp.value, "planned": [s.get("name") for s in inp.steps]}


def _unescape(value: Any) -> Any:
    """``{"$$ref": ...}`` -> ``{"$ref": ...}``: a plan carried in this step's input writes its
    references escaped, or they would be resolved as this step's own input."""
    if isinstance(value, dict):
        return {("$ref" if k == "$$ref" else k): _unescape(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_unescape(v) for v in value]
    return value


def escape(value: Any) -> Any:
    """The reverse of `_unescape`, for building a TEST_PLAN step's input."""
    if isinstance(value, dict):
        return {("$$ref" if k == "$ref" else k): escape(v) for k, v in value.items()}
    if isinstance(value, list):
        return [escape(v) for v in value]
    return value


def plan_step(name: str, steps: list[dict[str, Any]], *deps: str, **extra: Any) -> dict[str, Any]:
    """A TEST_PLAN step adding `steps` (their references escaped in its input)."""
    inp: dict[str, Any] = {"steps": escape(steps)}
    for key in ("gate", "value"):
        if key in extra:
            inp[key] = extra.pop(key)
    return {"name": name, "tool": "TEST_PLAN", "input": inp, "dependsOn": list(deps), **extra}
