"""Traces (OpenTelemetry), with the optional extra ``pgdag[otel]``; no-ops without it.

Two spans, on the global tracer provider (`opentelemetry.trace.get_tracer_provider`: set
it up in the process, e.g. with ``opentelemetry-instrument`` or in a module that
``PGDAG_TOOLS`` loads; docs/operations.md, "Traces"):

- ``pgdag.run`` (kind PRODUCER), started by ``POST /runs`` as a child of the request's
  ``traceparent`` (if any) and ended when the run is stored. Its context is stored with
  the run (``runs.trace_context``, migration 0008) as the W3C carrier
  ``{"traceparent": ...}``: a run outlives the request and every process, so the span
  stands for its submission and the attempts hang under it;
- ``pgdag.attempt`` (kind CONSUMER), one per attempt in the worker or agent that claimed
  it, a child of the run's span through the stored context, with the attributes
  ``pgdag.run_id``, ``pgdag.step``, ``pgdag.tool``, ``pgdag.attempt``, ``pgdag.worker``,
  ``pgdag.lease_token`` and, at its end, ``pgdag.outcome`` (`OUTCOMES`). Its W3C carrier
  is the tool's ``ToolContext.trace_context``: HTTP_GET_JSON sends it as the
  ``traceparent`` header, user tools pass it on the same way.

Without opentelemetry installed every function here does nothing and every carrier is
empty. With the API but no SDK (or no provider set), spans do not record; a ``traceparent``
that came in is passed on unchanged (OpenTelemetry's own behaviour).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from types import MappingProxyType
from typing import Any

try:
    from opentelemetry import propagate, trace
    from opentelemetry.trace import SpanKind, Status, StatusCode
except ImportError:  # pragma: no cover - the otel extra is not installed
    trace = None  # type: ignore[assignment]

TRACER_NAME = "pgdag"
RUN_SPAN = "pgdag.run"
ATTEMPT_SPAN = "pgdag.attempt"
# What an attempt came to (``pgdag.outcome``): its result was recorded (succeeded), it
# failed (retried later or dead-lettered: ``pgdag.dead_letter`` says which), its lease was
# gone (lease_lost: the fencing token was refused or the heartbeat lost it), its output was
# refused (refused: recorded as a failed attempt), the worker stopped it (cancelled), or
# its outcome could not be recorded (error: the lease expires and the reaper requeues it).
OUTCOMES = ("succeeded", "failed", "lease_lost", "refused", "cancelled", "error")


def enabled() -> bool:
    """Whether opentelemetry (the API at least) is installed."""
    return trace is not None


def recording() -> bool:
    """Whether spans may be recorded: opentelemetry is installed and a tracer provider was
    set (an SDK's; without one the API's tracers make no-op spans)."""
    if trace is None:
        return False
    provider = trace.get_tracer_provider()
    return not isinstance(provider, (trace.ProxyTracerProvider, trace.NoOpTracerProvider))


# The carrier of a handle with nothing to pass on: shared, so read-only.
EMPTY_CARRIER: Mapping[str, str] = MappingProxyType({})


class SpanHandle:
    """What pgdag's code does with a span: read its W3C carrier, set attributes (named
    ``pgdag.<key>``), mark it failed. A handle without a span (tracing off) does nothing."""

    def __init__(self, span: Any = None, *, passed_on: Mapping[str, str] | None = None) -> None:
        self._span = span
        self._passed_on = dict(passed_on) if passed_on else {}

    def carrier(self) -> Mapping[str, str]:
        """The span's context as W3C headers (``traceparent``, ``tracestate`` if any);
        without a span, the context it passes on unchanged (empty: none; the one read-only
        `EMPTY_CARRIER`, not a new dict per attempt)."""
        if self._span is None:
            return dict(self._passed_on) if self._passed_on else EMPTY_CARRIER
        if not self._span.get_span_context().is_valid:
            return {}
        carrier: dict[str, str] = {}
        propagate.inject(carrier, context=trace.set_span_in_context(self._span))
        return carrier

    def set(self, **attributes: str | int | bool | None) -> None:
        """Set ``pgdag.<key>`` attributes (None values are skipped)."""
        if self._span is None:
            return
        for key, value in attributes.items():
            if value is not None:
                self._span.set_attribute(f"pgdag.{key}", value)

    def fail(self, message: str) -> None:
        """Mark the span's status ERROR with `message`."""
        if self._span is not None:
            self._span.set_status(Status(StatusCode.ERROR, message[:1000]))


NO_SPAN = SpanHandle()
"""A handle without a span or a context to pass on: it does nothing, so one serves every
holder that has none yet."""


def flush(timeout_s: float = 5.0) -> bool:
    """Export the spans the tracer provider still holds, waiting up to `timeout_s` seconds;
    False when it did not finish in time. A process that stops by a signal (uvicorn
    re-raises SIGTERM after its shutdown) runs no ``atexit`` hook, where the SDK would flush:
    the API calls this as its lifespan ends. Does nothing without an SDK provider."""
    if trace is None:
        return True
    force_flush = getattr(trace.get_tracer_provider(), "force_flush", None)
    if force_flush is None:
        return True
    return bool(force_flush(int(timeout_s * 1000)))


@contextlib.contextmanager
def run_span(headers: Mapping[str, str], **attributes: str | int | None) -> Iterator[SpanHandle]:
    """The ``pgdag.run`` span of a submission, a child of the W3C context in `headers` (the
    request's), current inside the block; `attributes` become ``pgdag.<key>``."""
    if trace is None:
        yield SpanHandle()
        return
    tracer = trace.get_tracer(TRACER_NAME)
    with tracer.start_as_current_span(
        RUN_SPAN, context=propagate.extract(dict(headers)), kind=SpanKind.PRODUCER
    ) as span:
        handle = SpanHandle(span)
        handle.set(**attributes)
        yield handle


@contextlib.contextmanager
def attempt_span(
    trace_context: Mapping[str, str] | None, **attributes: str | int | None
) -> Iterator[SpanHandle]:
    """The ``pgdag.attempt`` span, a child of the run's stored context `trace_context`
    (none: a root span), current inside the block; `attributes` become ``pgdag.<key>``.
    An exception leaving the block marks the span failed and is re-raised."""
    if not recording():
        # Nothing would be recorded: skip the span (34 us an attempt through the API's
        # no-op tracer, measured) and pass the run's context on as it is, as a non-recording
        # span would.
        yield SpanHandle(passed_on=trace_context)
        return
    tracer = trace.get_tracer(TRACER_NAME)
    parent = propagate.extract(dict(trace_context)) if trace_context else None
    with tracer.start_as_current_span(
        ATTEMPT_SPAN,
        context=parent,
        kind=SpanKind.CONSUMER,
        record_exception=False,
        set_status_on_exception=False,
    ) as span:
        handle = SpanHandle(span)
        handle.set(**attributes)
        yield handle
