"""Logging: one configuration (`configure_logging`) for every pgdag process, through structlog.

Two formats, ``PGDAG_LOG_FORMAT`` (``--log-format``):

- ``console`` (default), for people: the line pgdag always printed,
  ``2026-12-03 07:02:23,123 INFO workers.worker: attempt started``, followed by the context
  bound to the line (``[run_id=... step=fetch attempt=1 worker=w0 lease_token=17]``);
- ``json``, for machines: one JSON object per line with ``timestamp`` (ISO 8601, UTC),
  ``level``, ``logger``, ``event`` (the message) and the context keys, plus ``exception``
  (the traceback text) when there is one.

The code logs with the standard library (``logging.getLogger(__name__)``, lazy ``%``
arguments); the handler's `structlog.stdlib.ProcessorFormatter` renders those records and
structlog's own loggers alike. Context comes from `structlog.contextvars` (the API's agent
routes bind ``agent``) and from `bind_attempt`, with which the worker puts ``run_id``,
``step``, ``attempt``, ``worker`` and ``lease_token`` on each attempt's task; keys passed as
``extra={...}`` are added too.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import json
import logging
import sys
from collections.abc import Awaitable, Callable, Iterator, Mapping, MutableMapping
from datetime import UTC, datetime
from typing import Any, Protocol, TextIO, TypeVar

import structlog

from engine.errors import ConfigError

LOG_FORMATS = ("console", "json")
LOG_FORMAT_DEFAULT = "console"
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
# Keys of every event that are not context: rendered in the line's fixed part (console).
_FIXED_KEYS = frozenset({"timestamp", "level", "logger", "event", "exception", "stack"})
# Context keys in the order they are shown; any other key follows, in the order bound.
CONTEXT_ORDER = ("run_id", "step", "attempt", "worker", "lease_token", "agent")

EventDict = MutableMapping[str, Any]
T = TypeVar("T")

# The attempt a worker's task is running (`bind_attempt`): one context variable set once per
# attempt to an object that builds its keys only when a line is logged (`_merge_attempt`).
# Binding the five keys through structlog.contextvars cost 2 us an attempt, a tenth of the
# worker's own CPU per step in W1; building the dict up front, another 0.5 us
# (docs/benchmarks.md, issue 13).
_ATTEMPT: contextvars.ContextVar[AttemptContext | None] = contextvars.ContextVar(
    "pgdag_attempt", default=None
)


class AttemptContext(Protocol):
    """What `bind_attempt` takes: an object that gives the attempt's log keys on demand."""

    def log_context(self) -> Mapping[str, Any]:
        """``run_id``, ``step``, ``attempt``, ``worker``, ``lease_token``."""
        ...


def check_log_format(raw: str) -> str:
    """``PGDAG_LOG_FORMAT``'s value, lowercased; raises `ConfigError` naming the variable
    when it is not one of `LOG_FORMATS`."""
    value = raw.strip().lower()
    if value not in LOG_FORMATS:
        raise ConfigError(f"PGDAG_LOG_FORMAT must be one of {', '.join(LOG_FORMATS)}, got {raw!r}")
    return value


def _check_level(level: str | int) -> int:
    if isinstance(level, int):
        return level
    name = level.strip().upper()
    if name not in LOG_LEVELS:
        raise ConfigError(f"--log-level must be one of {', '.join(LOG_LEVELS)}, got {level!r}")
    number: int = logging.getLevelName(name)
    return number


def _record_time(_: Any, __: str, event: EventDict) -> EventDict:
    """``timestamp``: when the record was made (not when it is rendered), ISO 8601 UTC to the
    millisecond."""
    record = event.get("_record")
    created = record.created if record is not None else datetime.now(UTC).timestamp()
    stamp = datetime.fromtimestamp(created, UTC).isoformat(timespec="milliseconds")
    event["timestamp"] = stamp.replace("+00:00", "Z")
    event["_created"] = created
    return event


def _context(event: EventDict) -> dict[str, Any]:
    """The event's context keys in `CONTEXT_ORDER` (internal ``_`` keys left out)."""
    rest = {k: v for k, v in event.items() if k not in _FIXED_KEYS and k[0] != "_"}
    first = {k: rest.pop(k) for k in CONTEXT_ORDER if k in rest}
    return {**first, **rest}


def _value(value: Any) -> str:
    text = str(value)
    return repr(text) if (not text or any(c.isspace() for c in text) or "=" in text) else text


class ConsoleLine:
    """The ``console`` renderer: ``<local time>,<ms> <LEVEL> <logger>: <event>``, the bound
    context as ``[key=value ...]`` (values with spaces quoted), then the traceback."""

    def __call__(self, _: Any, __: str, event: EventDict) -> str:
        created = event.get("_created", datetime.now(UTC).timestamp())
        local = datetime.fromtimestamp(created).astimezone()
        when = local.strftime("%Y-%m-%d %H:%M:%S") + f",{int(created * 1000) % 1000:03d}"
        line = f"{when} {str(event.get('level', '')).upper()} {event.get('logger', '-')}: "
        line += str(event.get("event", ""))
        context = _context(event)
        if context:
            line += " [" + " ".join(f"{k}={_value(v)}" for k, v in context.items()) + "]"
        for key in ("exception", "stack"):
            if event.get(key):
                line += "\n" + str(event[key])
        return line


def _json_line(_: Any, __: str, event: EventDict) -> str:
    """The ``json`` renderer: the event as one JSON object (values it cannot encode as
    their ``str``)."""
    data = {k: event[k] for k in ("timestamp", "level", "logger", "event") if k in event}
    data.update(_context(event))
    data.update({k: event[k] for k in ("exception", "stack") if k in event})
    return json.dumps(data, default=str, ensure_ascii=False)


def _logger_name(logger: Any, method: str, event: EventDict) -> EventDict:
    """``logger``: the stdlib logger's name (for structlog's own loggers too)."""
    record = event.get("_record")
    if record is not None:
        event["logger"] = record.name
        return event
    return structlog.stdlib.add_logger_name(logger, method, event)


def _formatter(fmt: str) -> structlog.stdlib.ProcessorFormatter:
    renderer: Any = _json_line if fmt == "json" else ConsoleLine()
    return structlog.stdlib.ProcessorFormatter(
        # For records of the standard library's loggers (structlog's own went through the
        # processors of `configure_logging` already).
        foreign_pre_chain=[
            structlog.contextvars.merge_contextvars,
            _merge_attempt,
            structlog.stdlib.ExtraAdder(),
            structlog.stdlib.add_log_level,
            _logger_name,
        ],
        processors=[
            _record_time,
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            structlog.processors.format_exc_info,
            renderer,
        ],
    )


class _PgdagHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """The root handler `configure_logging` installs (and replaces when called again)."""


def configure_logging(
    level: str | int = "INFO", fmt: str = LOG_FORMAT_DEFAULT, *, stream: TextIO | None = None
) -> None:
    """Send every log record of the process, the standard library's and structlog's, to
    `stream` (default stderr) in format `fmt` (``console`` or ``json``) from `level` up.

    Calling it again replaces the handler it installed (handlers of others are removed too,
    as `logging.basicConfig(force=True)` does). Raises `ConfigError` for an unknown format
    (naming ``PGDAG_LOG_FORMAT``) or level.
    """
    fmt = check_log_format(fmt)
    number = _check_level(level)
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            _merge_attempt,
            structlog.stdlib.filter_by_level,
            structlog.stdlib.add_log_level,
            _logger_name,
            structlog.stdlib.PositionalArgumentsFormatter(),
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=False,
    )
    handler = _PgdagHandler(stream if stream is not None else sys.stderr)
    handler.setFormatter(_formatter(fmt))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
        if isinstance(old, _PgdagHandler):
            old.close()
    root.addHandler(handler)
    root.setLevel(number)


def bind(**context: Any) -> None:
    """Add `context` to every line logged from here on in this task (or thread); undone
    at the end of the enclosing `scoped` block."""
    structlog.contextvars.bind_contextvars(**context)


def bind_attempt(context: AttemptContext) -> None:
    """Put the attempt's context (`AttemptContext.log_context`: run, step name, attempt
    number, worker id, fencing token) on every line logged from here on in this task: the
    hot path's `bind`, one context-variable write; the keys are read only when a line is
    logged. A task started after this (`asyncio.create_task` copies the context) inherits
    it."""
    _ATTEMPT.set(context)


def _merge_attempt(_: Any, __: str, event: EventDict) -> EventDict:
    """Add the `bind_attempt` context to `event` (keys bound otherwise win)."""
    context = _ATTEMPT.get()
    if context is not None:
        for key, value in context.log_context().items():
            event.setdefault(key, value)
    return event


@contextlib.contextmanager
def bound(**context: Any) -> Iterator[None]:
    """`context` on every line logged inside the block (in this task), removed after."""
    with structlog.contextvars.bound_contextvars(**context):
        yield


@contextlib.contextmanager
def scoped() -> Iterator[None]:
    """Whatever `bind` adds inside the block is undone at its end (the context before it
    is restored)."""
    saved = structlog.contextvars.get_contextvars()
    try:
        yield
    finally:
        structlog.contextvars.clear_contextvars()
        if saved:
            structlog.contextvars.bind_contextvars(**saved)


def scoped_handler(fn: Callable[[T], Awaitable[Any]]) -> Callable[[T], Awaitable[Any]]:
    """`fn` (an async request handler) run inside `scoped`: context it binds ends with it."""

    @functools.wraps(fn)
    async def wrapped(arg: T) -> Any:
        with scoped():
            return await fn(arg)

    return wrapped
