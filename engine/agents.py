"""The agent protocol: workers that reach only the API (``POST /agent/*``, docs/agents.md).

An *agent* is a worker on another machine, network or language: it holds no
``DATABASE_URL`` and talks HTTP/JSON to these five routes (plus ``/agent/stopped``):

- ``register``: its id, tools and concurrency; writes its ``workers`` row (kind ``agent``);
- ``claim``: up to ``max`` ready steps of its tools, each with its resolved input, attempt,
  fencing token (``leaseToken``) and lease expiry; long-polls up to ``waitMs`` on the one
  shared ``LISTEN pgdag_ready`` of this process (`engine.ready`), re-polling at least every
  ``PGDAG_POLL_INTERVAL`` seconds in case a NOTIFY was lost;
- ``heartbeat``: extend leases by (step, token); the answer says which are held (with their
  new expiry) and which were lost;
- ``report``: a batch of outcomes, each under its token. A stale token refuses that outcome
  only (``lease_lost``); an outcome reported again under the token that recorded it
  answers ``recorded`` with ``duplicate: true`` (nothing written twice);
- ``release``: hand back leases on a graceful shutdown; ``stopped``: mark the row stopped.

Everything goes through `engine.store.Store` and so `engine.transitions`: the same fenced
statements as database workers; nothing here writes ``steps``. Claimed steps that need no
tool run are finished by the API itself under the lease and never sent to the agent: a
reference that did not resolve fails the attempt (not retryable), a map step is expanded,
a map step's join is completed (as `workers.worker.Worker` does).
"""

from __future__ import annotations

import asyncio
import logging
import random
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from engine import logs, metrics
from engine.bodies import json_body
from engine.config import Settings
from engine.errors import LeaseLost, OutputRefused, UnstorableJson, ValidationFailed
from engine.openapi import Operation, Reply
from engine.ready import ReadySignal
from engine.store import StepState, Store
from engine.transitions import ClaimedStep, output_json

logger = logging.getLogger(__name__)

AGENT_ID_PATTERN = r"^[A-Za-z0-9._:@-]+$"
MAX_TOOLS = 100
MAX_CLAIM = 100
MAX_LEASES = 1000
MAX_OUTCOMES = 500
MAX_ERROR_CHARS = 65_536
INT32_MAX = 2**31 - 1
BIGINT_MAX = 2**63 - 1

AgentId = Annotated[
    str,
    Field(
        min_length=1,
        max_length=200,
        pattern=AGENT_ID_PATTERN,
        description="the agent's id, unique among workers: letters, digits and ._:@-",
    ),
]
# "$" starts pgdag's own tools ("$run": a run step, taken by the maintenance leader only).
ToolName = Annotated[str, Field(min_length=1, max_length=200, pattern=r"^[^$]")]
StepId = Annotated[int, Field(ge=1, le=BIGINT_MAX)]
LeaseToken = Annotated[int, Field(ge=1, le=BIGINT_MAX, description="the attempt's fencing token")]


class _Body(BaseModel):
    """A request body: camelCase keys, nothing extra, JSON types taken as they are (a
    string is not an int, a bool is not a number)."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True, strict=True)


class RegisterRequest(_Body):
    """``POST /agent/register``: who the agent is and what it can run. Registering an id
    again (a restart) is allowed: the row is refreshed."""

    agent_id: AgentId = Field(alias="agentId")
    tools: list[ToolName] = Field(min_length=1, max_length=MAX_TOOLS)
    concurrency: int = Field(ge=1, le=1000)
    hostname: str | None = Field(default=None, min_length=1, max_length=255)
    pid: int | None = Field(default=None, ge=0, le=INT32_MAX)
    restarts: int = Field(default=0, ge=0, le=INT32_MAX, description="told by its supervisor")
    last_exit_code: int | None = Field(
        default=None, alias="lastExitCode", ge=-INT32_MAX, le=INT32_MAX
    )


class ClaimRequest(_Body):
    """``POST /agent/claim``: up to `max` ready steps of `tools`, waiting up to `waitMs`
    milliseconds (at most ``PGDAG_AGENT_MAX_WAIT``) when none is ready."""

    agent_id: AgentId = Field(alias="agentId")
    tools: list[ToolName] = Field(min_length=1, max_length=MAX_TOOLS)
    max: int = Field(ge=1, le=MAX_CLAIM)
    wait_ms: int = Field(default=0, alias="waitMs", ge=0)


class LeaseRef(_Body):
    """One attempt, named by its step and fencing token."""

    step_id: StepId = Field(alias="stepId")
    lease_token: LeaseToken = Field(alias="leaseToken")


class HeartbeatRequest(_Body):
    """``POST /agent/heartbeat``: extend these leases."""

    agent_id: AgentId = Field(alias="agentId")
    leases: list[LeaseRef] = Field(max_length=MAX_LEASES)


class Succeeded(_Body):
    """An attempt that succeeded, with its tool's output (any JSON)."""

    step_id: StepId = Field(alias="stepId")
    lease_token: LeaseToken = Field(alias="leaseToken")
    status: Literal["succeeded"]
    output: Any = None


class Failed(_Body):
    """An attempt that failed: `retryable` lets it run again after a backoff (attempts
    left and the step idempotent), else it is dead-lettered."""

    step_id: StepId = Field(alias="stepId")
    lease_token: LeaseToken = Field(alias="leaseToken")
    status: Literal["failed"]
    error: str = Field(min_length=1, max_length=MAX_ERROR_CHARS)
    retryable: bool


Outcome = Annotated[Succeeded | Failed, Field(discriminator="status")]


class ReportRequest(_Body):
    """``POST /agent/report``: outcomes, each under its own token; answered one by one."""

    agent_id: AgentId = Field(alias="agentId")
    outcomes: list[Outcome] = Field(min_length=1, max_length=MAX_OUTCOMES)


class ReleaseRequest(_Body):
    """``POST /agent/release``: hand these leases back (graceful shutdown)."""

    agent_id: AgentId = Field(alias="agentId")
    leases: list[LeaseRef] = Field(max_length=MAX_LEASES)


class StoppedRequest(_Body):
    """``POST /agent/stopped``: the agent has stopped; its row says so."""

    agent_id: AgentId = Field(alias="agentId")


# --- answers (described for the OpenAPI document; built as dicts below) ------------------


class _Answer(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class Registered(_Answer):
    """What the agent should use: the lease TTL, how often to heartbeat, the longest wait."""

    agent_id: str = Field(alias="agentId")
    lease_ttl_ms: int = Field(alias="leaseTtlMs")
    heartbeat_interval_ms: int = Field(alias="heartbeatIntervalMs")
    max_wait_ms: int = Field(alias="maxWaitMs")


class AgentStep(_Answer):
    """A claimed attempt: run `tool` on `input` (references already resolved) and report
    under `leaseToken` before `leaseExpiresAt` (heartbeat to extend it)."""

    step_id: int = Field(alias="stepId")
    run_id: str = Field(alias="runId")
    name: str
    tool: str
    input: Any
    attempt: int
    max_attempts: int = Field(alias="maxAttempts")
    timeout_ms: int | None = Field(alias="timeoutMs")
    idempotent: bool
    idempotency_key: str = Field(alias="idempotencyKey")
    lease_token: int = Field(alias="leaseToken")
    lease_expires_at: str = Field(alias="leaseExpiresAt")
    trace_context: dict[str, str] | None = Field(
        default=None,
        alias="traceContext",
        description="the run's W3C trace context (traceparent, tracestate): the parent of "
        "the attempt's span; absent when the run has none",
    )


class Claimed(_Answer):
    """The attempts claimed (empty when nothing became ready within waitMs)."""

    steps: list[AgentStep]


class HeldLease(_Answer):
    """A lease extended, until `leaseExpiresAt`."""

    step_id: int = Field(alias="stepId")
    lease_token: int = Field(alias="leaseToken")
    lease_expires_at: str = Field(alias="leaseExpiresAt")


class LostLease(_Answer):
    """A lease no longer held (expired, reaped, cancelled, re-claimed): stop the attempt."""

    step_id: int = Field(alias="stepId")
    lease_token: int = Field(alias="leaseToken")


class Heartbeat(_Answer):
    """Each lease sent, held or lost."""

    held: list[HeldLease]
    lost: list[LostLease]


class OutcomeResult(_Answer):
    """What became of one outcome: ``recorded`` (``duplicate`` when this outcome was
    recorded before, under the same token), or ``refused`` with a ``code``: ``lease_lost`` (the
    token is stale) or ``output_refused`` (the output cannot be stored: the attempt failed
    for good)."""

    step_id: int = Field(alias="stepId")
    lease_token: int = Field(alias="leaseToken")
    result: Literal["recorded", "refused"]
    code: Literal["lease_lost", "output_refused"] | None = None
    message: str | None = None
    duplicate: bool | None = None
    retry_at: str | None = Field(default=None, alias="retryAt")
    dead_letter: bool | None = Field(default=None, alias="deadLetter")


class Reported(_Answer):
    """One result per outcome, in the order sent."""

    results: list[OutcomeResult]


class Released(_Answer):
    """How many leases were handed back (stale ones are ignored)."""

    released: int


class Stopped(_Answer):
    """Nothing to say."""


# --- routes --------------------------------------------------------------------------------


def _store(request: Request) -> Store:
    store: Store = request.app.state.store
    return store


def _settings(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


def _not_registered(agent_id: str) -> JSONResponse:
    return JSONResponse(
        {
            "error": "agent_not_registered",
            "message": f"agent {agent_id!r} is not registered (or said it stopped); "
            "POST /agent/register first",
        },
        status_code=409,
    )


def _duplicates(field: str, ids: list[int]) -> None:
    """Raises `ValidationFailed` naming the first step id listed twice in `field`."""
    seen: set[int] = set()
    for i, step_id in enumerate(ids):
        if step_id in seen:
            raise ValidationFailed(
                [
                    {
                        "step": None,
                        "field": f"{field}.{i}.stepId",
                        "problem": f"step {step_id} is listed twice",
                    }
                ],
                subject="request",
            )
        seen.add(step_id)


def _step_json(step: ClaimedStep) -> dict[str, Any]:
    extra = {"traceContext": step.trace_context} if step.trace_context else {}
    return {
        "stepId": step.id,
        "runId": step.run_id,
        "name": step.name,
        "tool": step.tool,
        "input": step.input,
        "attempt": step.attempt,
        "maxAttempts": step.max_attempts,
        "timeoutMs": step.timeout_ms,
        "idempotent": step.idempotent,
        "idempotencyKey": step.idempotency_key,
        "leaseToken": step.lease_token,
        "leaseExpiresAt": step.lease_expires_at.isoformat(),
        **extra,
    }


async def _agent_body(request: Request, model: type[_Body], **kwargs: Any) -> Any:
    """`json_body`, then ``agent`` (its agentId) on every line the request logs after
    (`engine.logs`; the route's `logs.scoped_handler` ends it with the request)."""
    body = await json_body(request, model, **kwargs)
    logs.bind(agent=body.agent_id)
    return body


async def register(request: Request) -> Response:
    """Register (or re-register) an agent: 200 with the timings it should use."""
    body: RegisterRequest = await _agent_body(request, RegisterRequest)
    settings = _settings(request)
    client = request.client.host if request.client is not None else "unknown"
    await _store(request).register_worker(
        body.agent_id,
        hostname=body.hostname or client,
        pid=body.pid or 0,
        concurrency=body.concurrency,
        tools=sorted(set(body.tools)),
        kind="agent",
        restarts=body.restarts,
        last_exit_code=body.last_exit_code,
    )
    logger.info(
        "agent %s registered: tools %s, concurrency %d",
        body.agent_id,
        ", ".join(sorted(set(body.tools))),
        body.concurrency,
    )
    return JSONResponse(
        {
            "agentId": body.agent_id,
            "leaseTtlMs": round(settings.lease_ttl_s * 1000),
            "heartbeatIntervalMs": round(settings.lease_ttl_s * 1000 / 3),
            "maxWaitMs": round(settings.agent_max_wait_s * 1000),
        }
    )


async def _finish_in_api(
    store: Store, settings: Settings, agent_id: str, step: ClaimedStep
) -> None:
    """Finish a claimed step that needs no tool run, under its lease (as the worker does):
    an unresolved reference fails the attempt for good, a map step expands, a map step's
    join completes. Failures are logged (with the attempt's context, `engine.logs`): the
    lease expires and the reaper requeues it."""
    with logs.bound(
        run_id=step.run_id, step=step.name, attempt=step.attempt, lease_token=step.lease_token
    ):
        await _finish_step(store, settings, agent_id, step)


async def _finish_step(store: Store, settings: Settings, agent_id: str, step: ClaimedStep) -> None:
    try:
        if step.input_error is not None:
            await store.fail(
                step,
                error=step.input_error,
                retryable=False,
                worker_id=agent_id,
                backoff_base_ms=settings.backoff_base_ms,
                backoff_cap_ms=settings.backoff_cap_ms,
            )
        elif step.map_expand:
            expansion = await store.expand_map(
                step, worker_id=agent_id, max_width=settings.max_map_width
            )
            if expansion.problem is not None:
                await store.fail(
                    step,
                    error=expansion.problem,
                    retryable=False,
                    worker_id=agent_id,
                    backoff_base_ms=settings.backoff_base_ms,
                    backoff_cap_ms=settings.backoff_cap_ms,
                )
        else:  # a map step's join: complete_steps builds its output
            await store.complete(step, output_json(None), worker_id=agent_id)
    except LeaseLost as exc:
        logger.warning("run %s step %s (for agent %s): %s", step.run_id, step.name, agent_id, exc)
    except Exception:  # the lease will expire; the other steps of the claim go on
        logger.exception(
            "run %s step %s (for agent %s): cannot finish it in the API",
            step.run_id,
            step.name,
            agent_id,
        )


async def claim(request: Request) -> Response:
    """Claim up to ``max`` ready steps of ``tools``, long-polling up to ``waitMs``."""
    body: ClaimRequest = await _agent_body(request, ClaimRequest)
    settings = _settings(request)
    max_wait_ms = round(settings.agent_max_wait_s * 1000)
    if body.wait_ms > max_wait_ms:
        raise ValidationFailed(
            [
                {
                    "step": None,
                    "field": "waitMs",
                    "problem": f"must be <= {max_wait_ms} (PGDAG_AGENT_MAX_WAIT)",
                }
            ],
            subject="request",
        )
    store = _store(request)
    if not await store.agent_touch(body.agent_id):
        return _not_registered(body.agent_id)
    ready: ReadySignal = request.app.state.ready
    loop = asyncio.get_running_loop()
    deadline = loop.time() + body.wait_ms / 1000
    touched = loop.time()
    tools = sorted(set(body.tools))
    while True:
        seen = ready.generation()
        claimed = await store.claim(body.agent_id, body.max, tools=tools)
        for step in claimed:
            metrics.count_claim(step.tool, step.ready_wait_s)
        handed = [s for s in claimed if not (s.input_error or s.map_expand or s.map_join)]
        for step in claimed:
            if step.input_error or step.map_expand or step.map_join:
                await _finish_in_api(store, settings, body.agent_id, step)
        if handed:
            return JSONResponse({"steps": [_step_json(s) for s in handed]})
        if claimed:
            continue  # finished some here (a map expanded): more may be ready now
        remaining = deadline - loop.time()
        if remaining <= 0:
            return JSONResponse({"steps": []})
        # Woken by NOTIFY; re-polls anyway (a NOTIFY sent while not listening is lost), and
        # at least every third of the lease TTL, when the agent's row is refreshed.
        repoll_s = settings.poll_interval_s * (0.8 + random.random() * 0.4)
        try:
            await ready.wait(seen, min(remaining, repoll_s, settings.lease_ttl_s / 3))
        except asyncio.CancelledError:
            # The server is stopping (`serve` cancels requests still running
            # PGDAG_SHUTDOWN_GRACE seconds after SIGTERM): nothing was claimed in this wait,
            # so answer like a wait that ran out instead of dropping the connection.
            return JSONResponse({"steps": []}, headers={"Connection": "close"})
        if await request.is_disconnected():
            return JSONResponse({"steps": []})  # nobody to hand steps to: claim nothing
        if loop.time() - touched >= settings.lease_ttl_s / 3:
            # A waiting agent is a live one (GET /workers, POST /runs' tool check), even
            # when it waits longer than the lease TTL.
            touched = loop.time()
            if not await store.agent_touch(body.agent_id):
                return _not_registered(body.agent_id)  # it said it stopped meanwhile


async def heartbeat(request: Request) -> Response:
    """Extend leases; answer which are held (until when) and which were lost."""
    body: HeartbeatRequest = await _agent_body(request, HeartbeatRequest)
    _duplicates("leases", [lease.step_id for lease in body.leases])
    store = _store(request)
    if not await store.agent_touch(body.agent_id):
        return _not_registered(body.agent_id)
    held = await store.heartbeat_until(
        [(lease.step_id, lease.lease_token) for lease in body.leases], owner=body.agent_id
    )
    return JSONResponse(
        {
            "held": [
                {
                    "stepId": lease.step_id,
                    "leaseToken": lease.lease_token,
                    "leaseExpiresAt": held[lease.step_id].isoformat(),
                }
                for lease in body.leases
                if lease.step_id in held
            ],
            "lost": [
                {"stepId": lease.step_id, "leaseToken": lease.lease_token}
                for lease in body.leases
                if lease.step_id not in held
            ],
        }
    )


def _without_outputs(body: Any) -> Any:
    """The report body whose text is checked up front: outputs are checked one by one (an
    unstorable one refuses its outcome, not the batch), errors are stored with visible
    escapes (`engine.jsonb.storable_text`)."""
    if not isinstance(body, dict) or not isinstance(body.get("outcomes"), list):
        return body
    outcomes = [
        {k: v for k, v in o.items() if k not in ("output", "error")} if isinstance(o, dict) else o
        for o in body["outcomes"]
    ]
    return {**body, "outcomes": outcomes}


def _refused(outcome: Succeeded | Failed, code: str, message: str) -> dict[str, Any]:
    return {
        "stepId": outcome.step_id,
        "leaseToken": outcome.lease_token,
        "result": "refused",
        "code": code,
        "message": message,
    }


def _held_by_another(outcome: Succeeded | Failed, state: StepState | None, agent_id: str) -> bool:
    """Whether `outcome`'s attempt is running under a lease another worker holds. Its
    token is current, but tokens are sequential numbers, not secrets: only the claimer may
    end the attempt. (The write itself is guarded by ``lease_owner`` too, which settles a
    race with a claim after this read.)"""
    return (
        state is not None
        and state.status == "running"
        and state.lease_token == outcome.lease_token
        and state.lease_owner != agent_id
    )


def _not_owner(outcome: Succeeded | Failed) -> dict[str, Any]:
    return _refused(
        outcome,
        "not_owner",
        f"step {outcome.step_id}: the attempt with lease token {outcome.lease_token} was "
        "not claimed by this agent",
    )


def _recorded(outcome: Succeeded | Failed, **extra: Any) -> dict[str, Any]:
    return {
        "stepId": outcome.step_id,
        "leaseToken": outcome.lease_token,
        "result": "recorded",
        **extra,
    }


def _count_report(
    outcomes: list[Succeeded | Failed],
    results: list[dict[str, Any] | None],
    states: dict[int, StepState],
) -> None:
    """Count a report's outcomes in `engine.metrics` (duplicates were counted the first
    time): attempts by outcome, their durations, retries, dead letters and fencing refusals.
    A step that does not exist (a bogus id) is counted under tool ``unknown``."""
    for outcome, result in zip(outcomes, results, strict=True):
        if result is None or result.get("duplicate"):
            continue
        state = states.get(outcome.step_id)
        tool = state.tool if state is not None else "unknown"
        if result["result"] == "refused":
            code = result["code"]
            if code == "lease_lost":
                metrics.count_result(tool, "lease_lost")
            elif code == "output_refused":  # the attempt was failed for good instead
                metrics.count_result(tool, "refused", dead_letter=True)
            else:  # not_owner: the fenced write refused it
                metrics.count_result(tool, "refused", fenced=True)
            continue
        duration_s = (
            state.running_s
            if state is not None and state.lease_token == outcome.lease_token
            else None
        )
        if isinstance(outcome, Succeeded):
            metrics.count_result(tool, "succeeded", duration_s=duration_s)
            continue
        dead = bool(result.get("deadLetter"))
        metrics.count_result(
            tool, "failed", duration_s=duration_s, retried=not dead, dead_letter=dead
        )


async def report(request: Request) -> Response:
    """Record a batch of outcomes, each under its own token; one result per outcome."""
    body: ReportRequest = await _agent_body(request, ReportRequest, text_checked=_without_outputs)
    _duplicates("outcomes", [o.step_id for o in body.outcomes])
    settings = _settings(request)
    store = _store(request)
    agent_id = body.agent_id
    results: list[dict[str, Any] | None] = [None] * len(body.outcomes)
    successes = [(i, o) for i, o in enumerate(body.outcomes) if isinstance(o, Succeeded)]
    # One read for the duplicates check and the metrics' tool labels and durations.
    states = await store.step_states([o.step_id for o in body.outcomes])
    batch: list[tuple[int, Succeeded, str]] = []
    for i, success in successes:
        state = states.get(success.step_id)
        if _held_by_another(success, state, agent_id):
            results[i] = _not_owner(success)
            continue
        if state is not None and (state.status, state.lease_token) == (
            "succeeded",
            success.lease_token,
        ):
            if await store.success_recorded(
                success.step_id, success.lease_token, worker_id=agent_id
            ):
                results[i] = _recorded(success, duplicate=True)  # its first answer was lost
            else:
                results[i] = _not_owner(success)
            continue
        try:
            text = output_json(success.output, max_bytes=settings.max_output_bytes)
        except UnstorableJson as exc:  # the attempt fails for good, as a worker's would
            try:
                await store.fail_lease(
                    success.step_id,
                    success.lease_token,
                    error=str(exc),
                    retryable=False,
                    worker_id=agent_id,
                    backoff_base_ms=settings.backoff_base_ms,
                    backoff_cap_ms=settings.backoff_cap_ms,
                )
            except LeaseLost as lost:
                results[i] = _refused(success, "lease_lost", str(lost))
            else:
                results[i] = _refused(success, "output_refused", str(exc))
            continue
        batch.append((i, success, text))
    if batch:
        written = await store.complete_many(
            [(o.step_id, o.lease_token, text) for _, o, text in batch], worker_id=agent_id
        )
        for i, success, _ in batch:
            problem = written.get(success.step_id)
            if problem is None:
                results[i] = _recorded(success)
            elif isinstance(problem, OutputRefused):
                results[i] = _refused(success, "output_refused", str(problem))
            else:
                results[i] = _refused(success, "lease_lost", str(problem))
    for i, outcome in enumerate(body.outcomes):
        if not isinstance(outcome, Failed):
            continue
        if _held_by_another(outcome, states.get(outcome.step_id), agent_id):
            results[i] = _not_owner(outcome)
            continue
        try:
            failed = await store.fail_lease(
                outcome.step_id,
                outcome.lease_token,
                error=outcome.error,
                retryable=outcome.retryable,
                worker_id=agent_id,
                backoff_base_ms=settings.backoff_base_ms,
                backoff_cap_ms=settings.backoff_cap_ms,
            )
        except LeaseLost as lost:
            before = await store.failure_recorded(
                outcome.step_id, outcome.lease_token, worker_id=agent_id
            )
            if before is None:
                results[i] = _refused(outcome, "lease_lost", str(lost))
            elif before[0] == "ready":  # its first answer was lost
                results[i] = _recorded(outcome, duplicate=True, retryAt=before[1], deadLetter=False)
            else:
                results[i] = _recorded(outcome, duplicate=True, deadLetter=True)
            continue
        if failed.status == "ready":
            results[i] = _recorded(
                outcome, retryAt=failed.available_at.isoformat(), deadLetter=False
            )
        else:
            results[i] = _recorded(outcome, deadLetter=True)
    _count_report(body.outcomes, results, states)
    refused = sum(1 for r in results if r is not None and r["result"] == "refused")
    if refused:
        logger.info("agent %s: %d of %d outcome(s) refused", agent_id, refused, len(results))
    return JSONResponse({"results": results})


async def release(request: Request) -> Response:
    """Hand back leases (graceful shutdown): idempotent steps are ready again at once."""
    body: ReleaseRequest = await _agent_body(request, ReleaseRequest)
    released = await _store(request).release(
        [(lease.step_id, lease.lease_token) for lease in body.leases], worker_id=body.agent_id
    )
    return JSONResponse({"released": released})


async def stopped(request: Request) -> Response:
    """Mark the agent's workers row stopped."""
    body: StoppedRequest = await _agent_body(request, StoppedRequest)
    await _store(request).worker_stopped(body.agent_id)
    logger.info("agent %s stopped", body.agent_id)
    return JSONResponse({})


routes = [
    Route("/agent/register", logs.scoped_handler(register), methods=["POST"]),
    Route("/agent/claim", logs.scoped_handler(claim), methods=["POST"]),
    Route("/agent/heartbeat", logs.scoped_handler(heartbeat), methods=["POST"]),
    Route("/agent/report", logs.scoped_handler(report), methods=["POST"]),
    Route("/agent/release", logs.scoped_handler(release), methods=["POST"]),
    Route("/agent/stopped", logs.scoped_handler(stopped), methods=["POST"]),
]

_DB = {503: "postgres is not answering"}
_NOT_REGISTERED = {409: "agent_not_registered: register first", **_DB}

OPERATIONS: list[Operation] = [
    Operation(
        "POST",
        "/agent/register",
        "agentRegister",
        "Register an agent (a worker that reaches only the API)",
        {200: Reply(Registered, "the timings the agent should use")},
        errors=_DB,
        body=RegisterRequest,
        body_example={"agentId": "agent-1", "tools": ["DELAY"], "concurrency": 4},
    ),
    Operation(
        "POST",
        "/agent/claim",
        "agentClaim",
        "Claim ready steps of the agent's tools, long-polling up to waitMs",
        {200: Reply(Claimed, "the attempts claimed; empty after waitMs")},
        errors=_NOT_REGISTERED,
        body=ClaimRequest,
        body_example={"agentId": "agent-1", "tools": ["DELAY"], "max": 4, "waitMs": 0},
    ),
    Operation(
        "POST",
        "/agent/heartbeat",
        "agentHeartbeat",
        "Extend the agent's leases; say which were lost",
        {200: Reply(Heartbeat, "each lease, held or lost")},
        errors=_NOT_REGISTERED,
        body=HeartbeatRequest,
        body_example={"agentId": "agent-1", "leases": [{"stepId": 1, "leaseToken": 1}]},
    ),
    Operation(
        "POST",
        "/agent/report",
        "agentReport",
        "Report outcomes, each under its own fencing token",
        {200: Reply(Reported, "one result per outcome, in order")},
        errors=_DB,
        body=ReportRequest,
        body_example={
            "agentId": "agent-1",
            "outcomes": [
                {"stepId": 1, "leaseToken": 1, "status": "succeeded", "output": {"ok": True}}
            ],
        },
    ),
    Operation(
        "POST",
        "/agent/release",
        "agentRelease",
        "Hand leases back on a graceful shutdown",
        {200: Reply(Released, "how many were released")},
        errors=_DB,
        body=ReleaseRequest,
        body_example={"agentId": "agent-1", "leases": []},
    ),
    Operation(
        "POST",
        "/agent/stopped",
        "agentStopped",
        "Mark the agent stopped",
        {200: Reply(Stopped, "done")},
        errors=_DB,
        body=StoppedRequest,
        body_example={"agentId": "agent-1"},
    ),
]
