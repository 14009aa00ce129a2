"""The HTTP API (Starlette): runs, their events, cancel, retry, workers, health; the agent
protocol (`engine.agents`, ``POST /agent/*``, whose long-polls wait on this process's one
`engine.ready.ReadySignal`); and the WebSocket routes (`engine.ws`) fed by this process's
`engine.live.EventHub`.

JSON in and out, camelCase fields. Errors are ``{"error": code, "message": text}`` plus
``"problems"`` (each naming the step, the field and the problem) for a refused run.
In front of the routes, `engine.guards` answers 421 for a Host the API does not answer
to, 401 without a token (when one is configured: ``PGDAG_API_TOKEN`` or a live scoped token,
`engine.tokens`; ``/health`` is open), 403 for a token whose scope does not allow the
request, and 415 for a POST that is not ``Content-Type: application/json``; CORS only for
``PGDAG_CORS_ORIGINS``.
The API process is also a candidate for the maintenance lead (`engine.maintenance`: the
reaper, the pruner, the audit-log partitions, the liveness check; one leader across all
processes).
``GET /metrics`` (admin scope) exports Prometheus metrics: this process's counters and the
queue and Postgres-health gauges (`engine.metrics`; docs/operations.md, "Metrics").
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import os
import re
import socket
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import replace
from importlib import metadata
from typing import Any, get_args

from prometheus_client import CollectorRegistry
from pydantic import BaseModel, ConfigDict, Field, RootModel
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route, WebSocketRoute
from starlette.types import ASGIApp

from engine import agents, jsonb, metrics, openapi, responses, schedule_api, tracing, ws
from engine.bodies import json_body as _json_body
from engine.bodies import read_body as _read_body
from engine.config import Settings, check_interval
from engine.dag import SIGNAL_NAME_PATTERN, ApiDatetime, RunSpec, parse_run
from engine.db import RETRYABLE, open_pool, resolve_database_url
from engine.errors import (
    IllegalTransition,
    NotFound,
    ScheduleNameTaken,
    UnstorableJson,
    ValidationFailed,
)
from engine.gcpause import gc_paused
from engine.guards import AllowedHosts, BearerAuth, HostGuard, JsonOnly
from engine.internal_error import InternalErrorGuard
from engine.live import EventHub
from engine.maintenance import MaintenanceService, default_tasks, holder_of
from engine.openapi import Operation, Reply
from engine.ready import ReadySignal
from engine.schema import SchemaGate, SchemaGuard
from engine.startup import wait_for_postgres
from engine.store import Store
from engine.tokens import TokenCache, TokenStore
from engine.tools import load_tool_modules, registered_tools

logger = logging.getLogger(__name__)

RUN_STATUSES: tuple[str, ...] = get_args(responses.RunStatus)
LIST_LIMIT_DEFAULT = 50
LIST_LIMIT_MAX = 500
CORS_MAX_AGE_S = 600  # how long a browser may cache a preflight answer
# How long a request waits for a pooled connection before it answers 503: the bound on a
# read during a Postgres outage (plus the pool's connect_timeout, see engine.db).
POOL_TIMEOUT_S = 5.0
CURSOR_MAX = 2**62
EVENTS_LIMIT_DEFAULT = 1000
EVENTS_LIMIT_MAX = 10_000


def _error(status: int, code: str, message: str, **extra: Any) -> JSONResponse:
    return JSONResponse({"error": code, "message": message, **extra}, status_code=status)


def _store(request: Request) -> Store:
    store: Store = request.app.state.store
    return store


def _run_id(request: Request) -> str:
    raw = request.path_params["run_id"]
    try:
        return str(uuid.UUID(raw))
    except ValueError:
        raise NotFound(f"no run {raw}") from None


def _int_param(request: Request, name: str, default: int | None, lo: int, hi: int) -> int | None:
    raw = request.query_params.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ValidationFailed(
            [{"step": None, "field": name, "problem": f"must be an integer, got {raw!r}"}]
        ) from None
    if not lo <= value <= hi:
        raise ValidationFailed(
            [{"step": None, "field": name, "problem": f"must be between {lo} and {hi}"}]
        )
    return value


# --- routes -------------------------------------------------------------------------------


async def health(request: Request) -> Response:
    """200 ``{"status": "ok"}`` when Postgres answers and its schema is at this package's
    head; else 503 ``{"status": "unavailable", "error": ...}`` saying which (for the schema,
    with the advice to run ``python -m engine migrate``)."""
    try:
        await asyncio.wait_for(_store(request).ping(), timeout=3)
    except Exception as exc:
        return JSONResponse(
            {"status": "unavailable", "error": f"postgres: {type(exc).__name__}"}, status_code=503
        )
    gate: SchemaGate = request.app.state.schema_gate
    problem = await gate.current()
    if problem is not None:
        return JSONResponse({"status": "unavailable", "error": problem}, status_code=503)
    return JSONResponse({"status": "ok"})


def _json_text(text: str, status_code: int = 200) -> Response:
    """A response whose body is JSON text already encoded (by Postgres, see Store)."""
    return Response(text, status_code=status_code, media_type="application/json")


async def _remote_tools(store: Store, body: Any) -> frozenset[str]:
    """The tools of live workers and agents, read only when `body` names a tool this
    process has not loaded (a step for an agent's tool); else nothing is read."""
    steps = body.get("steps") if isinstance(body, dict) else None
    if not isinstance(steps, list):
        return frozenset()
    local = registered_tools()
    named = {s.get("tool") for s in steps if isinstance(s, dict) and isinstance(s.get("tool"), str)}
    for s in steps:  # and the tools of child-run templates (steps of kind run)
        template = s.get("run") if isinstance(s, dict) else None
        inner = template.get("steps") if isinstance(template, dict) else None
        if isinstance(inner, list):
            named |= {
                c.get("tool")
                for c in inner
                if isinstance(c, dict) and isinstance(c.get("tool"), str)
            }
    if named <= local.keys():  # (a tool that is not a string is parse_run's to refuse)
        return frozenset()
    return await store.live_worker_tools()


async def create_run(request: Request) -> Response:
    """Submit a run: 201 with the run, 200 with the existing run for a repeated
    idempotencyKey with the same payload, 422 naming the step and problem for a bad graph
    (nothing written) and ``idempotency_key_reused`` for a key reused with another payload."""
    settings: Settings = request.app.state.settings
    raw = await _read_body(request, settings.max_body_bytes)
    try:
        with gc_paused():
            body = jsonb.loads(raw)
    except UnstorableJson as exc:  # NaN, Infinity: not stored, whichever tool it is for
        problem = {"step": None, "field": exc.path, "problem": exc.problem}
        raise ValidationFailed([problem]) from None
    except (ValueError, RecursionError) as exc:
        raise ValidationFailed(
            [{"step": None, "field": "body", "problem": f"not valid JSON: {exc}"}]
        ) from None
    store = _store(request)
    remote_tools = await _remote_tools(store, body)
    with gc_paused():  # synchronous: decoding and checking build objects, no cycles
        spec = parse_run(body, max_steps=settings.max_steps_per_run, remote_tools=remote_tools)
    # The run's span, a child of the request's traceparent; stored with the run, it is the
    # parent of every attempt's span (engine.tracing).
    with tracing.run_span(request.headers, steps=len(spec.steps)) as span:
        run_id, created = await store.create_run(spec, trace_context=span.carrier() or None)
        span.set(run_id=run_id, created=created)
    return _json_text(await store.get_run_json(run_id), status_code=201 if created else 200)


async def list_runs(request: Request) -> Response:
    """Runs newest first: ``?status=&limit=&cursor=``; ``nextCursor`` pages on."""
    status = request.query_params.get("status") or None
    if status is not None and status not in RUN_STATUSES:
        raise ValidationFailed(
            [
                {
                    "step": None,
                    "field": "status",
                    "problem": f"unknown status {status!r}; one of {', '.join(RUN_STATUSES)}",
                }
            ]
        )
    limit = _int_param(request, "limit", LIST_LIMIT_DEFAULT, 1, LIST_LIMIT_MAX)
    cursor = _int_param(request, "cursor", None, 1, CURSOR_MAX)
    assert limit is not None
    runs, next_cursor = await _store(request).list_runs(status=status, limit=limit, cursor=cursor)
    return JSONResponse(
        {"runs": runs, "nextCursor": str(next_cursor) if next_cursor is not None else None}
    )


async def get_run(request: Request) -> Response:
    """The run with every step: status, attempt, output, error, times."""
    return _json_text(await _store(request).get_run_json(_run_id(request)))


async def run_events(request: Request) -> Response:
    """The run's audit log, oldest first; ``?after=<eventId>&limit=`` to page."""
    after = _int_param(request, "after", 0, 0, CURSOR_MAX)
    limit = _int_param(request, "limit", EVENTS_LIMIT_DEFAULT, 1, EVENTS_LIMIT_MAX)
    assert after is not None and limit is not None
    events = await _store(request).list_events(_run_id(request), after=after, limit=limit)
    return JSONResponse({"events": events})


async def cancel_run(request: Request) -> Response:
    """Cancel a run that has not finished (409 if it has)."""
    run_id = _run_id(request)
    store = _store(request)
    await store.cancel_run(run_id)
    metrics.CANCELLATIONS.inc()
    return _json_text(await store.get_run_json(run_id))


async def retry_step(request: Request) -> Response:
    """Put a dead_letter step back to ready (409 if it is not in dead_letter)."""
    run_id = _run_id(request)
    store = _store(request)
    await store.retry_step(run_id, request.path_params["step_name"])
    return _json_text(await store.get_run_json(run_id))


SIGNAL_ID_MAX_CHARS = 255


class SignalPayload(RootModel[dict[str, Any]]):
    """The signal's payload: any JSON object (an empty body is ``{}``). It becomes the wait
    step's output, which later steps read with ``$ref``. For an approval, ``{"approved":
    false, "reason": "..."}`` rejects it (the step goes to dead_letter with the reason)."""


async def send_signal(request: Request) -> Response:
    """Send a signal to a run: ``POST /runs/{runId}/signals/{signal}`` with a JSON object
    as the payload and an optional ``Idempotency-Key`` header (the signal's id; one is
    generated when absent). 201 when recorded (completing the step that waits for it, or
    kept until that step is reached); 200 with the original for a repeated id; 404 unknown
    run; 409 a finished run, no step waiting for this signal, or that step already ended;
    422 a bad signal name, key or payload."""
    run_id = _run_id(request)
    signal = request.path_params["signal"]
    problems: list[dict[str, str | None]] = []
    if not re.fullmatch(SIGNAL_NAME_PATTERN, signal):
        problems.append(
            {"step": None, "field": "signal", "problem": f"must match {SIGNAL_NAME_PATTERN}"}
        )
    signal_id = request.headers.get("idempotency-key")
    if signal_id is None:
        signal_id = str(uuid.uuid4())
    elif not 1 <= len(signal_id) <= SIGNAL_ID_MAX_CHARS or not signal_id.isprintable():
        problems.append(
            {
                "step": None,
                "field": "Idempotency-Key",
                "problem": f"must be 1 to {SIGNAL_ID_MAX_CHARS} printable characters",
            }
        )
    if problems:
        raise ValidationFailed(problems, subject="request")
    body: SignalPayload = await _json_body(request, SignalPayload)
    try:
        payload_json = jsonb.dumps(body.root, path="body")
    except UnstorableJson as exc:
        raise ValidationFailed(
            [{"step": None, "field": "body", "problem": str(exc)}], subject="request"
        ) from None
    outcome = await _store(request).send_signal(
        run_id, signal, signal_id=signal_id, payload_json=payload_json
    )
    answer = responses.SignalReceived(
        run_id=run_id,
        id=outcome.id,
        signal=outcome.signal,
        payload=outcome.payload,
        received_at=outcome.received_at,
        repeated=not outcome.created,
        consumed_by=outcome.consumed_by,
        step_status=outcome.step_status,  # type: ignore[arg-type]
    )
    return JSONResponse(
        answer.model_dump(mode="json", by_alias=True), status_code=201 if outcome.created else 200
    )


class ReplayRequest(BaseModel):
    """``POST /runs/{runId}/replay`` body."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    from_step: str = Field(alias="from", min_length=1, max_length=300)
    reason: str = Field(default="replay requested", min_length=1, max_length=2000)


class RetryDeadLettersRequest(BaseModel):
    """``POST /runs/retry-dead-letters`` body: which dead letters to retry. Every filter
    is optional; `since` / `until` bound when the step was dead-lettered."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    tool: str | None = Field(default=None, min_length=1, max_length=128)
    run_status: str | None = Field(default=None, alias="runStatus", pattern="^(running|failed)$")
    since: ApiDatetime | None = None
    until: ApiDatetime | None = None
    limit: int = Field(default=1000, ge=1, le=10_000)
    dry_run: bool = Field(default=False, alias="dryRun")
    reason: str = Field(default="bulk retry of dead letters", min_length=1, max_length=2000)


async def replay_run(request: Request) -> Response:
    """Replay from a step: ``{"from": "stepName", "reason": "..."}``. That step and every
    step downstream of it are reset and run again; upstream outputs are reused. 200 with the
    run; 404 unknown run or step; 409 for a cancelled run or a step to reset still running."""
    run_id = _run_id(request)
    body: ReplayRequest = await _json_body(request, ReplayRequest)
    store = _store(request)
    await store.replay(run_id, body.from_step, reason=body.reason)
    return _json_text(await store.get_run_json(run_id))


async def retry_dead_letters(request: Request) -> Response:
    """Retry many dead letters at once, oldest first: ``{"tool", "runStatus", "since",
    "until", "limit", "dryRun", "reason"}`` (all optional). Returns the steps retried (or,
    with dryRun, that would be) and the ones that could not be, each with the reason."""
    body: RetryDeadLettersRequest = await _json_body(request, RetryDeadLettersRequest)
    if body.since is not None and body.until is not None and body.since >= body.until:
        raise ValidationFailed(
            [{"step": None, "field": "until", "problem": "must be later than since"}],
            subject="request",
        )
    store = _store(request)
    found = await store.dead_letters(
        tool=body.tool,
        run_status=body.run_status,
        since=body.since,
        until=body.until,
        limit=body.limit,
    )
    retried: list[dict[str, str]] = []
    refused: list[dict[str, str]] = []
    for run_id, step_name in found:
        if body.dry_run:
            retried.append({"runId": run_id, "stepName": step_name})
            continue
        try:
            await store.retry_step(run_id, step_name, reason=body.reason)
        except (IllegalTransition, NotFound) as exc:  # retried or cancelled meanwhile
            refused.append({"runId": run_id, "stepName": step_name, "reason": str(exc)})
            continue
        retried.append({"runId": run_id, "stepName": step_name})
    return JSONResponse(
        {
            "dryRun": body.dry_run,
            "matched": len(found),
            "retried": retried,
            "refused": refused,
        }
    )


async def maintenance_status(request: Request) -> Response:
    """This process's maintenance service (its role, each task's last run while it led) and
    who leads now, from ``pg_locks`` (`engine.maintenance`)."""
    service: MaintenanceService = request.app.state.maintenance
    body = service.status()
    row = await _store(request).maintenance_leader()
    body["leader"] = (
        None
        if row is None
        else {"holder": holder_of(row["application_name"] or ""), "backendPid": row["pid"]}
    )
    return JSONResponse(body)


async def list_workers(request: Request) -> Response:
    """Registered workers, their heartbeat, liveness and current steps."""
    return JSONResponse({"workers": await _store(request).list_workers()})


async def metrics_text(request: Request) -> Response:
    """Prometheus metrics in the text exposition format (docs/operations.md, "Metrics"):
    this process's counters and histograms, and the queue and Postgres-health gauges read
    at most once a second (`engine.metrics.QueueCollector`). 503 when Postgres does not
    answer the gauges' queries within `engine.metrics.SCRAPE_TIMEOUT_S` seconds."""
    collector: metrics.QueueCollector = request.app.state.queue_metrics
    try:
        await asyncio.wait_for(collector.refresh(), metrics.SCRAPE_TIMEOUT_S)
    except TimeoutError:  # (a pool timeout is an OperationalError: _db_down answers it)
        return _error(
            503,
            "database_unavailable",
            f"postgres did not answer the metrics queries in {metrics.SCRAPE_TIMEOUT_S:g} s",
        )
    body = metrics.render() + metrics.render(request.app.state.metrics_registry)
    return Response(body, media_type=metrics.CONTENT_TYPE)


async def queue_view(request: Request) -> Response:
    """The dashboard's queue view (docs/operations.md, "The queue view"): by tool, the
    ready, running and dead-lettered steps, the oldest ready age (seconds) and the live
    workers (the gauges of ``/metrics``, from the same snapshot, read at most once a
    second), the unfinished runs, and the steps succeeded per minute over the last
    `engine.metrics.THROUGHPUT_MINUTES` minutes (counted by this process's live listener
    since it started). 503 as ``/metrics`` when Postgres does not answer in time."""
    collector: metrics.QueueCollector = request.app.state.queue_metrics
    try:
        snap = await asyncio.wait_for(collector.refresh(), metrics.SCRAPE_TIMEOUT_S)
    except TimeoutError:  # (a pool timeout is an OperationalError: _db_down answers it)
        return _error(
            503,
            "database_unavailable",
            f"postgres did not answer the queue queries in {metrics.SCRAPE_TIMEOUT_S:g} s",
        )
    return JSONResponse(collector.queue_json(snap, now_s=time.time()))


@functools.cache
def _openapi_document() -> bytes:
    """The OpenAPI document of `OPERATIONS`, encoded once (it changes only with the code)."""
    try:
        version = metadata.version("pgdag")
    except metadata.PackageNotFoundError:  # run from a source tree that is not installed
        version = "0.0.0"
    run_spec = openapi.run_spec_for_tools(registered_tools())
    operations = [replace(op, body=run_spec) if op.body is RunSpec else op for op in OPERATIONS]
    doc = openapi.document(
        operations,
        title="pgdag",
        version=version,
        description="A durable DAG workflow engine whose only infrastructure is PostgreSQL.",
    )
    return json.dumps(doc, separators=(",", ":")).encode()


async def openapi_json(request: Request) -> Response:
    """The OpenAPI 3.1 document of this API, generated from its models (`engine.openapi`)."""
    return Response(_openapi_document(), media_type="application/json")


routes = [
    Route("/health", health, methods=["GET"]),
    Route("/runs", create_run, methods=["POST"]),
    Route("/runs", list_runs, methods=["GET"]),
    Route("/runs/retry-dead-letters", retry_dead_letters, methods=["POST"]),
    Route("/runs/{run_id}", get_run, methods=["GET"]),
    Route("/runs/{run_id}/events", run_events, methods=["GET"]),
    Route("/runs/{run_id}/cancel", cancel_run, methods=["POST"]),
    Route("/runs/{run_id}/steps/{step_name}/retry", retry_step, methods=["POST"]),
    Route("/runs/{run_id}/replay", replay_run, methods=["POST"]),
    Route("/runs/{run_id}/signals/{signal}", send_signal, methods=["POST"]),
    Route("/workers", list_workers, methods=["GET"]),
    Route("/maintenance", maintenance_status, methods=["GET"]),
    Route("/openapi.json", openapi_json, methods=["GET"]),
    Route("/metrics", metrics_text, methods=["GET"]),
    Route("/queue", queue_view, methods=["GET"]),
    *agents.routes,
    *schedule_api.routes,
    WebSocketRoute("/ws", ws.all_events),
    WebSocketRoute("/ws/runs/{run_id}", ws.run_events),
]


# --- the HTTP routes as data, for the OpenAPI document (engine.openapi) --------------------
# tests/unit/test_openapi.py checks that every HTTP route above has exactly one row here.


class RunPath(BaseModel):
    """Path parameter of the run routes (anything else than a UUID is an unknown run: 404)."""

    run_id: uuid.UUID = Field(alias="runId")


class StepPath(RunPath):
    """Path parameters of the step routes (a map child's name is ``<name>[<index>]``)."""

    step_name: str = Field(alias="stepName", min_length=1)


class SignalPath(RunPath):
    """Path parameters of ``POST /runs/{runId}/signals/{signal}``."""

    signal: str = Field(
        pattern=SIGNAL_NAME_PATTERN, description="the signal a wait step of the run waits for"
    )


class RunsQuery(BaseModel):
    """``GET /runs`` query parameters: the bounds `list_runs` checks."""

    status: responses.RunStatus | None = Field(default=None, description="only runs in it")
    limit: int = Field(default=LIST_LIMIT_DEFAULT, ge=1, le=LIST_LIMIT_MAX)
    cursor: int | None = Field(
        default=None, ge=1, le=CURSOR_MAX, description="the nextCursor of the previous page"
    )


class EventsQuery(BaseModel):
    """``GET /runs/{runId}/events`` query parameters: the bounds `run_events` checks."""

    after: int = Field(default=0, ge=0, le=CURSOR_MAX, description="only events with a larger id")
    limit: int = Field(default=EVENTS_LIMIT_DEFAULT, ge=1, le=EVENTS_LIMIT_MAX)


_RUN = Reply(responses.Run, "the run with every step")
_NO_RUN = {404: "no such run"}
_RUN_LINKS: dict[str, Any] = {
    name: {"operationId": name, "parameters": {"runId": "$response.body#/id"}}
    for name in ("getRun", "listRunEvents", "cancelRun", "replayRun")
}
_RUN_LINKS["retryStep"] = {
    "operationId": "retryStep",
    "parameters": {"runId": "$response.body#/id", "stepName": "$response.body#/steps/0/name"},
}
_EXAMPLE_RUN = {
    "goal": "two delays, one after the other",
    "steps": [
        {"name": "first", "tool": "DELAY", "input": {"ms": 10}},
        {"name": "second", "tool": "DELAY", "input": {"ms": 10}, "dependsOn": ["first"]},
    ],
}

OPERATIONS: list[Operation] = [
    Operation(
        "GET",
        "/health",
        "health",
        "Whether Postgres answers",
        {
            200: Reply(responses.Health, "Postgres answers"),
            503: Reply(responses.HealthUnavailable, "Postgres does not answer"),
        },
    ),
    Operation(
        "POST",
        "/runs",
        "createRun",
        "Submit a run",
        {
            201: Reply(responses.Run, "the run, created"),
            200: Reply(responses.Run, "the existing run of this idempotencyKey"),
        },
        errors={
            422: "a bad graph or body: every problem, naming the step and the field; "
            "nothing written",
            503: "postgres is not answering",
        },
        body=RunSpec,
        body_example=_EXAMPLE_RUN,
        links={201: _RUN_LINKS, 200: _RUN_LINKS},
    ),
    Operation(
        "GET",
        "/runs",
        "listRuns",
        "List runs, newest first",
        {200: Reply(responses.RunList, "a page of runs")},
        errors={422: "a bad query parameter, named", 503: "postgres is not answering"},
        query=RunsQuery,
    ),
    Operation(
        "POST",
        "/runs/retry-dead-letters",
        "retryDeadLetters",
        "Retry many dead letters at once, oldest first",
        {200: Reply(responses.RetryDeadLettersResult, "what was (or would be) retried")},
        errors={503: "postgres is not answering"},
        body=RetryDeadLettersRequest,
        body_required=False,
        body_example={"tool": "HTTP_GET_JSON", "dryRun": True, "limit": 10},
    ),
    Operation(
        "GET",
        "/runs/{run_id}",
        "getRun",
        "A run with every step",
        {200: _RUN},
        errors={**_NO_RUN, 503: "postgres is not answering"},
        path_params=RunPath,
    ),
    Operation(
        "GET",
        "/runs/{run_id}/events",
        "listRunEvents",
        "The run's audit log, oldest first",
        {200: Reply(responses.EventList, "the run's events")},
        errors={**_NO_RUN, 422: "a bad query parameter, named", 503: "postgres is not answering"},
        path_params=RunPath,
        query=EventsQuery,
    ),
    Operation(
        "POST",
        "/runs/{run_id}/cancel",
        "cancelRun",
        "Cancel a run that has not finished",
        {200: _RUN},
        errors={**_NO_RUN, 409: "the run has finished", 503: "postgres is not answering"},
        path_params=RunPath,
    ),
    Operation(
        "POST",
        "/runs/{run_id}/steps/{step_name}/retry",
        "retryStep",
        "Put a dead_letter step back to ready",
        {200: _RUN},
        errors={
            404: "no such run or step",
            409: "the step is not in dead_letter",
            503: "postgres is not answering",
        },
        path_params=StepPath,
    ),
    Operation(
        "POST",
        "/runs/{run_id}/replay",
        "replayRun",
        "Run a step and everything downstream of it again",
        {200: _RUN},
        errors={
            404: "no such run or step",
            409: "the run is cancelled, or a step to reset is still running",
            503: "postgres is not answering",
        },
        path_params=RunPath,
        body=ReplayRequest,
        body_example={"from": "second", "reason": "its input changed"},
    ),
    Operation(
        "POST",
        "/runs/{run_id}/signals/{signal}",
        "sendSignal",
        "Send a signal to a run: complete the wait step that waits for it",
        {
            201: Reply(responses.SignalReceived, "the signal, recorded (and consumed, or kept)"),
            200: Reply(responses.SignalReceived, "the original signal of this Idempotency-Key"),
        },
        errors={
            **_NO_RUN,
            409: "the run has finished, no step of it waits for this signal, or that step "
            "has already ended",
            422: "a bad signal name, Idempotency-Key or payload, named",
            503: "postgres is not answering",
        },
        path_params=SignalPath,
        body=SignalPayload,
        body_required=False,
        body_example={"approved": True, "by": "ada"},
    ),
    Operation(
        "GET",
        "/workers",
        "listWorkers",
        "Registered workers, their heartbeat and current steps",
        {200: Reply(responses.WorkerList, "the workers")},
        errors={503: "postgres is not answering"},
    ),
    Operation(
        "GET",
        "/maintenance",
        "getMaintenance",
        "The maintenance service: who leads, and this process's tasks and their last runs",
        {200: Reply(responses.Maintenance, "this process's maintenance status")},
        errors={503: "postgres is not answering"},
    ),
    Operation(
        "GET",
        "/openapi.json",
        "openapi",
        "This document",
        {200: Reply(None, "the OpenAPI 3.1 document of this API")},
    ),
    Operation(
        "GET",
        "/metrics",
        "metrics",
        "Prometheus metrics (text exposition format; admin scope)",
        {200: Reply(None, "the metrics, text/plain; version=0.0.4")},
        errors={503: "postgres is not answering"},
    ),
    Operation(
        "GET",
        "/queue",
        "queue",
        "The queue by tool and the steps succeeded per minute (the dashboard's queue view)",
        {200: Reply(responses.QueueView, "the queue, at most a second old")},
        errors={503: "postgres is not answering"},
    ),
    *agents.OPERATIONS,
    *schedule_api.OPERATIONS,
]


async def _not_found(request: Request, exc: Exception) -> Response:
    return _error(404, "not_found", str(exc))


async def _http_error(request: Request, exc: Exception) -> Response:
    """Starlette's own refusals (no such path: 404, a method the path does not take: 405)
    in the API's error shape instead of its plain-text default."""
    assert isinstance(exc, HTTPException)
    code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
    message = f"{request.method} {request.url.path}: {exc.detail}"
    return JSONResponse(
        {"error": code, "message": message}, status_code=exc.status_code, headers=exc.headers
    )


async def _conflict(request: Request, exc: Exception) -> Response:
    return _error(409, "illegal_transition", str(exc))


async def _name_taken(request: Request, exc: Exception) -> Response:
    return _error(409, "schedule_name_taken", str(exc))


async def _invalid(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ValidationFailed)
    return _error(422, exc.code, str(exc), problems=exc.problems)


async def _db_down(request: Request, exc: Exception) -> Response:
    return _error(503, "database_unavailable", f"postgres is not answering: {type(exc).__name__}")


def create_app(
    settings: Settings,
    *,
    database_url: str | None = None,
    bound: tuple[str, int] | None = None,
    extra_routes: Sequence[BaseRoute] = (),
) -> ASGIApp:
    """The ASGI app behind its guards (`engine.guards`: Host and WebSocket Origin, CORS
    when ``settings.cors_origins`` is set, bearer token and its scope, JSON-only state
    changes).

    The engine's own routes only: the program that serves it adds the rest, with
    `extra_routes` (mounted after the API's, behind the same guards: the dashboard) and
    ``settings.tool_modules`` (imported here, so submitted steps are checked against their
    tools' input schemas). `engine.__main__.create_server` is that program's composition.

    Raises `ConfigError` naming the variable for a maintenance interval that is not a finite
    number > 0 (`engine.maintenance.default_tasks`).

    `database_url` defaults to `resolve_database_url(settings)` at startup. `bound` is the
    (host, port) the server listens on: that name and port are answered besides the
    loopback names and ``settings.allowed_hosts`` (not for a wildcard bind like 0.0.0.0).
    Raises `ValueError` for a `bound` host that is not a host name or address.

    Start-up waits up to `settings.db_wait_s` for Postgres and fails (`DatabaseUnavailable`)
    on errors waiting cannot cure; a schema not at head does not stop it: every route but
    /health and the page answers 503 with the migrate advice until it is (`SchemaGate`).
    """
    load_tool_modules(settings.tool_modules)
    # Bad maintenance intervals end start-up here (ConfigError naming the variable: exit 2).
    tasks = default_tasks(settings)
    check_interval("PGDAG_MAINTENANCE_STANDBY_S", settings.maintenance_standby_s)
    gate = SchemaGate()
    token_cache = TokenCache()  # its store is set once the pool is open

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        url = database_url
        if url is None:
            url = await asyncio.to_thread(resolve_database_url, settings)
        await wait_for_postgres(url, wait_s=settings.db_wait_s)
        pool = await open_pool(url, min_size=2, max_size=10, name="api", timeout_s=POOL_TIMEOUT_S)
        gate.pool = pool
        token_cache.store = TokenStore(pool)
        app.state.schema_gate = gate
        await gate.current()  # logs the problem once, if there is one
        app.state.settings = settings
        app.state.store = Store(pool, lease_ttl_s=settings.lease_ttl_s)
        app.state.database_url = url
        app.state.hub = hub = EventHub(
            url,
            queue_max_events=settings.live_queue_max_events,
            stall_s=settings.live_stall_s,
        )
        await hub.start()
        # One LISTEN pgdag_ready for every agent's long-poll of this process.
        app.state.ready = ready = ReadySignal(url)
        await ready.start()
        app.state.metrics_registry = CollectorRegistry(auto_describe=True)
        app.state.queue_metrics = metrics.QueueCollector(
            pool, lease_ttl_s=settings.lease_ttl_s, tools=registered_tools()
        )
        app.state.metrics_registry.register(app.state.queue_metrics)

        async def schema_current() -> bool:
            return await gate.current() is None  # no schema to maintain (yet); /health says so

        app.state.maintenance = maintenance = MaintenanceService(
            url,
            app.state.store,
            settings,
            tasks,
            holder=f"api {socket.gethostname()}:{os.getpid()}",
            can_run=schema_current,
        )
        maintainer = asyncio.create_task(maintenance.run())
        try:
            yield
        finally:
            maintainer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await maintainer
            await ready.stop()
            await hub.stop()
            await gate.close()
            await token_cache.close()
            await pool.close()
            await asyncio.to_thread(tracing.flush)  # no atexit hook runs after a SIGTERM

    app = Starlette(
        routes=[*routes, *extra_routes],
        lifespan=lifespan,
        # Anything the handlers below do not cover: a JSON 500, the connection kept.
        middleware=[Middleware(InternalErrorGuard)],
        exception_handlers={
            HTTPException: _http_error,
            NotFound: _not_found,
            IllegalTransition: _conflict,
            ScheduleNameTaken: _name_taken,
            ValidationFailed: _invalid,
            **{cls: _db_down for cls in RETRYABLE},
        },
    )
    guarded: ASGIApp = BearerAuth(SchemaGuard(JsonOnly(app), gate), settings.api_token, token_cache)
    if settings.cors_origins:
        # Before auth: a browser sends the preflight without credentials. No cookies are
        # used (the token is a header), so no credentials mode.
        guarded = CORSMiddleware(
            guarded,
            allow_origins=list(settings.cors_origins),
            allow_methods=["GET", "POST", "DELETE"],
            allow_headers=["Authorization", "Content-Type"],
            max_age=CORS_MAX_AGE_S,
        )
    return HostGuard(
        guarded, AllowedHosts(settings.allowed_hosts, bound), cors_origins=settings.cors_origins
    )
