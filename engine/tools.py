"""The tool registry: tools are async functions with a declared input schema, registered by name.

A tool module registers its tools at import time with the `tool` decorator::

    from pydantic import BaseModel
    from engine.tools import ToolContext, tool

    class EchoInput(BaseModel):
        text: str

    @tool("ECHO", EchoInput)
    async def echo(inp: EchoInput, ctx: ToolContext) -> dict[str, object]:
        return {"text": inp.text, "key": ctx.idempotency_key}

The API imports the same modules to validate step inputs at submit time, and workers
import them to run steps. Which modules are loaded: the program's built-ins (the worker's
and ``python -m engine serve``'s are `workers.tools.builtin`), then `Settings.tool_modules`
(the comma-separated `PGDAG_TOOLS`). The engine itself ships no tool.
"""

from __future__ import annotations

import importlib
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

from pydantic import BaseModel

from engine.errors import ConfigError, UnknownTool

JSON = Any
ModelT = TypeVar("ModelT", bound=BaseModel)


@dataclass(frozen=True)
class ToolContext:
    """What a tool knows about the attempt it runs in.

    `idempotency_key` is ``"<runId>:<stepName>"``, the same on every attempt; pass it to
    any side-effecting call. `timeout_ms` is the step's per-attempt timeout, if any.
    `http_allow_private` mirrors `PGDAG_HTTP_ALLOW_PRIVATE`.

    `trace_context` is the attempt's span as W3C trace-context headers
    (``{"traceparent": "00-<trace id>-<span id>-01"}``, and ``"tracestate"`` when there is
    one), empty when tracing is off (`engine.tracing`). Send it with outgoing requests
    (``headers={**ctx.trace_context}``) so the services a tool calls join the run's trace,
    as HTTP_GET_JSON does.
    """

    run_id: str
    step_name: str
    attempt: int
    idempotency_key: str
    timeout_ms: int | None = None
    http_allow_private: bool = False
    trace_context: Mapping[str, str] = field(default_factory=dict)


ToolFn = Callable[[Any, ToolContext], Awaitable[JSON]]


@dataclass(frozen=True)
class Tool:
    """A registered tool: its `name`, the pydantic `input_model`, and the async `fn`."""

    name: str
    input_model: type[BaseModel]
    fn: ToolFn

    def parse_input(self, raw: JSON) -> BaseModel:
        """Validate `raw` against the input schema; raises `pydantic.ValidationError`."""
        return self.input_model.model_validate(raw)


_REGISTRY: dict[str, Tool] = {}


def tool(
    name: str, input_model: type[ModelT]
) -> Callable[[Callable[[ModelT, ToolContext], Awaitable[JSON]]], Callable[..., Awaitable[JSON]]]:
    """Register the decorated async function as tool `name` with input schema `input_model`.

    Raises `ConfigError` if another function already holds `name`.
    """

    if name.startswith("$"):  # "$run" is a run step's (engine.dag.CHILD_RUN_TOOL)
        raise ConfigError(f"tool {name!r}: names starting with '$' are pgdag's")

    def decorate(
        fn: Callable[[ModelT, ToolContext], Awaitable[JSON]],
    ) -> Callable[..., Awaitable[JSON]]:
        existing = _REGISTRY.get(name)
        if existing is not None and existing.fn is not fn:
            qual = f"{existing.fn.__module__}.{existing.fn.__qualname__}"
            if qual != f"{fn.__module__}.{fn.__qualname__}":
                raise ConfigError(f"tool {name!r} is already registered by {qual}")
        _REGISTRY[name] = Tool(name=name, input_model=input_model, fn=fn)
        return fn

    return decorate


def load_tool_modules(modules: Iterable[str]) -> None:
    """Import each module by dotted name so that its `@tool` registrations run.

    Raises `ConfigError` naming the module when it cannot be imported.
    """
    for module in modules:
        try:
            importlib.import_module(module)
        except ImportError as exc:
            raise ConfigError(f"cannot import tool module {module!r} (PGDAG_TOOLS): {exc}") from exc


def get_tool(name: str) -> Tool:
    """Return the tool registered as `name`; raises `UnknownTool`."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise UnknownTool(f"unknown tool {name!r}; known: {', '.join(sorted(_REGISTRY))}") from None


def registered_tools() -> dict[str, Tool]:
    """A copy of the registry, name to tool."""
    return dict(_REGISTRY)
