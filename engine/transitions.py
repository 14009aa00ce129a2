"""The step and run state machine. This module owns every status write in pgdag.

Step states (terminal ones in brackets)::

              create (no deps)
                   |
   create ---> pending --(last dependency succeeded)--> ready <-------------------+
                   |                                     |  ^                       |
                   |                                claim|  | fail (attempts left,   |
                   |                                     v  |  after backoff)        |
                   |                                  running --lease expired------+
                   |                                     |    (reaper; idempotent)   |
                   |                                     |--release (shutdown)-------+
                   |                                     |
                   |                  complete (token ok)|  fail (spent / not retryable /
                   |                                     |  "idempotent": false), lease
                   |                                     |  expired + "idempotent": false
                   v                                     v
             [skipped] <--upstream dead letter--   [succeeded]   [dead_letter] --retry--> ready
                 |                                                (attempts reset; its skipped
                 +--------------------------------- retry ------> pending   dependents too)
   any unfinished step of a cancelled run --> [cancelled]

A step with ``delayMs`` parks instead of becoming ready: when its last dependency is
decided (a root: when its run is inserted or replayed) it stays ``pending`` with no
dependency left and ``available_at`` = now (or the run's start) + its delay, audited
``step_delayed`` (pending -> pending, detail reason ``delay``, ``delayMs``, ``until``); it
holds no lease and no worker slot. ``promote_due_steps`` (the maintenance leader's reaper
pass, every ``PGDAG_REAPER_INTERVAL``) makes it ready when that time has come, audited
``step_ready`` with reason ``delay``; that row's NOTIFY on ``pgdag_ready`` wakes the
claimers. A run's delayed roots (``startAt``) take the same path with reason ``startAt``.
A manual retry of a dead letter runs it at once (its sleep came before its first attempt);
a replay sleeps again. A map step sleeps once, before it expands (its children and its join
do not); a failed attempt's backoff is unchanged.

A wait step (``"wait": {"signal", "timeoutS", "approval"}``, migration 0010) parks the same
way, its timeout as its delay (the same statements park it: ``available_at`` is its
deadline), and is never ``ready``: its tool is the reserved ``$wait``. A signal
(``send_signal``: ``POST /runs/{runId}/signals/{signal}``) recorded once per signal id in
``signals`` takes it pending -> running for an instant under a fresh fencing token
(``take_wait_step``, audited ``step_signalled``, lease owner ``signal:<id>``) and ends that
attempt in the same transaction through the worker path: ``complete_steps`` with the payload
as output (dependents decided, run settled), or for a rejected approval ``fail_attempt``
without retry (``dead_letter``). A signal that comes before its step waits is kept, and the
maintenance leader's pass delivers it once the step parks (``signals_to_deliver``). At the
deadline the same pass fails the attempt instead of promoting it (``time_out_wait_steps``):
it waits again with a new deadline (audited ``step_wait_timed_out``, pending -> pending)
while attempts remain, else ``dead_letter`` (dependents by their trigger rules). Signal and
timeout both lock the row and guard on ``pending``: exactly one of them wins. A manual retry
or a replay makes a wait step wait again.

A step of kind run (``"run": {template}``, tool ``$run``: no worker or agent can load it)
becomes ready like any step; then the maintenance leader (`start_child_runs`), in one
transaction, inserts its child run (idempotency key ``pgdag-child:<runId>:<step>:<attempt>:
<fencing token>``, ``runs.parent_run_id``/``parent_step_id``) and claims the step (ready ->
running, audited ``step_claimed`` with ``childRunId``; lease owner ``pgdag:child-runs``, a
lease that does not expire while the child runs). When the child ends, `finish_child_runs`
ends the attempt under its fencing token through the same transitions a worker uses:
``complete_steps`` (output ``{"runId", "outputs": {step: output}}``) for a completed child,
``fail_attempt`` for a failed one (retried per maxAttempts: a fresh child) or a cancelled
one (not retried: dead letter). Cancelling a run cancels its unfinished child runs in the
same transaction (`cancel_run`). A template cannot hold a run step (nesting depth 1).

Run states: pending --first claim--> running --> completed | failed | cancelled;
failed --manual retry of a dead letter--> running.

Every transition is one guarded statement (expected status, and for attempt writes the
fencing token ``lease_token`` plus a lease still live on the database clock) or one
transaction of such statements, and writes its audit_log rows in the same transaction. The
audit_log trigger (migration 0001) sends the NOTIFY. A guarded write that matches nothing
raises `LeaseLost` or `IllegalTransition`; it is never a silent no-op.

| transition                | from      | to                  | who             |
|---------------------------|-----------|---------------------|-----------------|
| create_run                | -         | pending / ready     | API             |
| claim_steps               | ready     | running             | worker          |
| complete_steps            | running   | succeeded (+promote)| worker          |
| complete_adding_steps     | running   | succeeded (+new steps, promote) | worker |
| fail_attempt              | running   | ready / dead_letter | worker          |
| release_steps             | running   | ready / dead_letter | worker shutdown |
| reap_expired_leases       | running   | ready / dead_letter | reaper          |
| promote_due_steps         | pending   | ready (parked, due) | reaper          |
| time_out_wait_steps       | pending   | pending / dead_letter (wait due) | reaper |
| take_wait_step            | pending   | running (a signal; then complete / fail) | API, reaper |
| cancel_run                | unfinished| cancelled (+children)| API            |
| start_child_runs          | ready     | running (child run) | maintenance     |
| finish_child_runs         | running   | succeeded / ready / dead_letter | maintenance |
| retry_dead_letter         | dead_letter | ready (+unskip)   | API             |
| expand_map                | running   | pending (children ready) | worker   |
| replay_from               | any but running | ready / pending / skipped | API   |
| fire_due_schedule         | -         | (create_run per fire time) | maintenance leader |

Schedules (migration 0012) have their own small machine, at the end of this module
(create, pause, resume, delete, and the leader's fire).

A step's trigger rule (``runIf``, `engine.rules`) decides what happens to it when its
dependencies end: ``complete_steps`` and ``fail_dependents`` count them down in SQL, and a
step one of them skips makes its own dependents count down in turn (`_settle_dependents`),
in the same transaction, so that a run can never be left waiting for a step nobody will end.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import psycopg
from psycopg import AsyncConnection
from psycopg.rows import DictRow

from engine import jsonb, schedules
from engine.dag import (
    CHILD_RUN_KEY_PREFIX,
    ExistingStep,
    RunSpec,
    child_run_spec,
    parse_added_steps,
    parse_run,
)
from engine.db import RETRYABLE
from engine.errors import (
    IdempotencyKeyReused,
    IllegalTransition,
    LeaseLost,
    NotFound,
    OutputRefused,
    PgdagError,
    ScheduleNameTaken,
    ScheduleNotFireable,
    StepsRefused,
    ValidationFailed,
)
from engine.gcpause import gc_paused
from engine.rules import GraphStep, ResetStep, plan_reset
from engine.sql import queries

logger = logging.getLogger(__name__)

Conn = AsyncConnection[DictRow]

TERMINAL_STEP_STATES = frozenset({"succeeded", "dead_letter", "skipped", "cancelled"})
TERMINAL_RUN_STATES = frozenset({"completed", "failed", "cancelled"})


@dataclass(frozen=True)
class ClaimedStep:
    """An attempt a worker holds: the step, its input, and the lease's fencing token."""

    id: int
    run_id: str
    name: str
    tool: str
    input: dict[str, Any]
    attempt: int
    max_attempts: int
    timeout_ms: int | None
    idempotent: bool
    lease_token: int
    lease_expires_at: datetime
    input_error: str | None = None
    map_expand: bool = False
    map_join: bool = False
    may_skip_children: bool = True
    # Seconds from the step's ready time (availableAt) to this claim, on the database clock
    # (`engine.metrics.READY_TO_START`); None when not known.
    ready_wait_s: float | None = None
    # The run's W3C trace context (``{"traceparent": ...}``, migration 0008): the parent of
    # the attempt's span (engine/tracing.py); None when the run has none.
    trace_context: dict[str, str] | None = None

    @property
    def idempotency_key(self) -> str:
        """``"<runId>:<stepName>"``: the same on every attempt of the step."""
        return f"{self.run_id}:{self.name}"


@dataclass(frozen=True)
class FailOutcome:
    """What a failed attempt led to: ``ready`` (retry at `available_at`) or ``dead_letter``."""

    status: str
    available_at: datetime
    backoff_ms: float


async def create_run(
    conn: Conn, spec: RunSpec, *, trace_context: Mapping[str, str] | None = None
) -> tuple[str, bool]:
    """Insert `spec` as a new run with its steps and edges, in one transaction.
    `trace_context` is the run span's W3C carrier, stored with a new run (`engine.tracing`).

    Returns ``(run_id, created)``; `created` is False when `spec.idempotency_key` already
    names a run submitted with the same payload (`RunSpec.fingerprint`), which is returned
    instead (nothing is written). Concurrent submits with one key all return the same run:
    the unique index makes the later inserts wait for the first and then find it.

    Raises `IdempotencyKeyReused` when the key names a run submitted with another payload
    (draft-ietf-httpapi-idempotency-key-header: a key reused with a different payload is an
    error). A run created before migration 0005 has no fingerprint: its key returns it
    whatever the payload, as it did when it was created.
    """
    fingerprint = spec.fingerprint() if spec.idempotency_key is not None else None
    with gc_paused():  # 10,000 rows built and dropped: nothing for the collector to find
        steps_json = spec.steps_json()
    async with conn.transaction():
        cur = await conn.execute(
            queries["insert_run"],
            {
                "goal": spec.goal,
                "idempotency_key": spec.idempotency_key,
                "idempotency_fingerprint": fingerprint,
                "steps_total": len(spec.steps),
                "priority": spec.priority,
                "start_at": spec.start_at,
                "trace_context": json.dumps(dict(trace_context)) if trace_context else None,
            },
        )
        row = await cur.fetchone()
        if row is None:
            assert spec.idempotency_key is not None  # only a key can conflict
            cur = await conn.execute(
                queries["select_run_by_key"], {"idempotency_key": spec.idempotency_key}
            )
            existing = await cur.fetchone()
            if existing is None:  # the conflicting run was deleted between the two statements
                raise IllegalTransition("idempotency key conflict; submit again")
            known = existing["idempotency_fingerprint"]
            if known is not None and known != fingerprint:
                raise IdempotencyKeyReused(spec.idempotency_key, str(existing["id"]))
            return str(existing["id"]), False
        run_id = str(row["id"])
        await conn.execute(
            queries["insert_steps"],
            {
                "run_id": run_id,
                "steps": steps_json,
                "priority": spec.priority,
                "start_at": spec.start_at,
            },
        )
    return run_id, True


async def claim_steps(
    conn: Conn, *, worker_id: str, limit: int, lease_ttl_s: float, tools: Sequence[str]
) -> list[ClaimedStep]:
    """Claim up to `limit` ready steps for `worker_id` (ready -> running), each with a new
    fencing token and a lease of `lease_ttl_s` seconds on the database clock.

    Only steps whose tool is in `tools` (tool names, e.g. ``["DELAY", "HTTP_GET_JSON"]``:
    the ones the claiming worker has loaded) are claimed; a step of another tool stays
    ready, unspent, for a worker that has it (``waitingFor`` says ``noLiveWorker`` while
    none lives). Empty `tools` claims nothing. Raises `ValueError` when `tools` is a bare
    string (a common slip that would otherwise match nothing).

    One statement on an autocommit connection: it commits by itself, in one round trip
    instead of three (BEGIN, the statement, COMMIT); a statement is atomic either way."""
    if isinstance(tools, str):
        raise ValueError(f"tools must be a sequence of tool names, not the string {tools!r}")
    if not tools:
        return []
    _require_autocommit(conn)
    cur = await conn.execute(
        queries["claim_steps"],
        {
            "worker_id": worker_id,
            "limit": limit,
            "lease_ttl_s": lease_ttl_s,
            "tools": sorted(set(tools)),  # one walk per tool (pgdag_pick_ready)
        },
    )
    rows = await cur.fetchall()
    return [
        ClaimedStep(
            id=r["id"],
            run_id=str(r["run_id"]),
            name=r["name"],
            tool=r["tool"],
            input=r["input"] if r["resolved_input"] is None else r["resolved_input"].get("input"),
            input_error=None if r["resolved_input"] is None else r["resolved_input"].get("error"),
            map_expand=r["map_expand"],
            map_join=r["map_join"],
            may_skip_children=r["may_skip_children"],
            attempt=r["attempt"],
            max_attempts=r["max_attempts"],
            timeout_ms=r["timeout_ms"],
            idempotent=r["idempotent"],
            lease_token=r["lease_token"],
            lease_expires_at=r["lease_expires_at"],
            ready_wait_s=r["ready_wait_s"],
            trace_context=r["trace_context"],
        )
        for r in rows
    ]


async def heartbeat_leases(
    conn: Conn, leases: list[tuple[int, int]], *, lease_ttl_s: float, owner: str | None = None
) -> set[int]:
    """Extend the leases ``[(step_id, token), ...]``; returns the ids still held.

    A step missing from the result has lost its lease (expired, reaped, cancelled or
    re-claimed): the worker must stop that attempt, whose result would be refused anyway.
    With `owner` (a worker id), only leases claimed by that worker are extended.
    """
    return set(await heartbeat_leases_until(conn, leases, lease_ttl_s=lease_ttl_s, owner=owner))


async def heartbeat_leases_until(
    conn: Conn, leases: list[tuple[int, int]], *, lease_ttl_s: float, owner: str | None = None
) -> dict[int, datetime]:
    """`heartbeat_leases`, saying until when each lease held now lasts: ``{step_id:
    lease_expires_at}`` (database clock) for the ids still held; a missing id was lost."""
    if not leases:
        return {}
    async with conn.transaction():
        cur = await conn.execute(
            queries["heartbeat_leases"],
            {
                "ids": [i for i, _ in leases],
                "tokens": [t for _, t in leases],
                "lease_ttl_s": lease_ttl_s,
                "owner": owner,
            },
        )
        rows = await cur.fetchall()
    return {r["id"]: r["lease_expires_at"] for r in rows}


async def complete_steps(
    conn: Conn,
    results: list[tuple[int, int, str]],
    *,
    worker_id: str,
    may_skip: bool = True,
) -> set[int]:
    """Record successes ``[(step_id, token, output_json_text), ...]``.

    Each becomes ``succeeded`` only if its token is current and its lease live; dependents
    whose last dependency this was are decided by their trigger rule and the run finishes
    when nothing is left. Returns the ids recorded. (The output of a map step's join is built
    by the statement; its text here is ignored.)

    `may_skip`: some step of the batch has a dependent with ``"runIf": "any_failed"``
    (`ClaimedStep.may_skip_children`), which its success may skip; the statement then runs in
    a transaction with the settling of the skipped step's own dependents. Otherwise it runs
    alone on the autocommit connection: one round trip, and the run row's lock is released
    when the statement ends instead of a COMMIT round trip later (measured: that wait cost
    W2, whose completions share run rows, about a third of its rate).
    """
    if not results:
        return set()
    if not may_skip and conn.autocommit:
        rows = await _complete_statement(conn, results, worker_id)
        skipped = [(r["id"], str(r["run_id"])) for r in rows if r["skipped"]]
        if skipped:  # may_skip_children is set at submit for every such parent: not expected
            logger.warning("completion skipped %d step(s) its caller did not expect", len(skipped))
            async with conn.transaction():
                await _settle_dependents(conn, skipped, are_dead=False, already_counted=True)
        return {r["id"] for r in rows if not r["skipped"]}
    async with conn.transaction():
        rows = await _complete_statement(conn, results, worker_id)
        skipped = [(r["id"], str(r["run_id"])) for r in rows if r["skipped"]]
        if skipped:
            await _settle_dependents(conn, skipped, are_dead=False, already_counted=True)
    return {r["id"] for r in rows if not r["skipped"]}


async def _complete_statement(
    conn: Conn, results: list[tuple[int, int, str]], worker_id: str
) -> list[DictRow]:
    cur = await conn.execute(
        queries["complete_steps"],
        {
            "ids": [r[0] for r in results],
            "tokens": [r[1] for r in results],
            "outputs": [r[2] for r in results],
            "worker_id": worker_id,
        },
    )
    return await cur.fetchall()


async def complete_step(
    conn: Conn,
    step_id: int,
    token: int,
    output_json: str,
    *,
    worker_id: str,
    may_skip: bool = True,
) -> None:
    """Record one success; raises `LeaseLost` when the token is not current.

    Safe to call again after an ambiguous commit (the connection dropped after COMMIT):
    finding the step already ``succeeded`` under the same token is success, not an error.
    When Postgres refuses the write (an output jsonb cannot hold), the attempt is failed,
    not retryably, with the database's error, and `OutputRefused` is raised.
    """
    try:
        recorded = await complete_steps(
            conn, [(step_id, token, output_json)], worker_id=worker_id, may_skip=may_skip
        )
    except RETRYABLE:
        raise
    except REFUSED_WRITE as exc:
        raise await _refuse_success(conn, step_id, token, exc, worker_id=worker_id) from None
    if step_id in recorded:
        return
    state = await _lease_state(conn, step_id)
    if state is not None and state["status"] == "succeeded" and state["lease_token"] == token:
        return
    raise LeaseLost(_lease_lost_message(step_id, token, state))


@dataclass(frozen=True)
class AddedSteps:
    """What `complete_adding_steps` did: the names of the steps added, in order."""

    names: list[str]


async def complete_adding_steps(
    conn: Conn,
    step_id: int,
    token: int,
    output_json: str,
    steps: Any,
    *,
    worker_id: str,
    max_steps: int,
    tools: Collection[str],
) -> AddedSteps:
    """Record the success of attempt (`step_id`, `token`) together with the steps its tool
    added to the run (`steps`: a decoded JSON list of step objects, as ``POST /runs`` takes
    them), in one transaction: the attempt is locked under the same guard as
    `complete_steps` (token, owner, running, lease live), then the run; the new steps are
    validated against the run's steps (`engine.dag.parse_added_steps`; `max_steps` is
    ``PGDAG_MAX_STEPS``, `tools` the tool names a step may use besides the ones loaded here:
    the live workers' and agents'), inserted with their edges and counted on the run
    (``insert_added_steps``, audited ``steps_added``), and the success is recorded by
    `complete_steps` (which makes ready the new steps that waited only for it). All of it or
    none of it is written.

    Raises `LeaseLost` when the attempt is no longer ours (nothing written), and
    `OutputRefused` when Postgres refuses a row (the attempt was then failed, not
    retryably, with the database's error, and nothing of the steps written). When the new
    steps are refused (deterministic: the same tool would add them again), nothing of them
    is written, the attempt is failed, not retryably (a dead letter), with an error naming
    every problem as a 422 body would, and `StepsRefused` is raised. Safe to call again
    after an ambiguous commit: finding the step ``succeeded`` under `token` (and its
    ``steps_added`` row) returns what was added; finding it a dead letter under `token`
    raises `StepsRefused` again.
    """
    try:
        async with conn.transaction():
            cur = await conn.execute(
                queries["lock_adding_step"],
                {"id": step_id, "token": token, "worker_id": worker_id},
            )
            adder = await cur.fetchone()
            if adder is None:
                raise _AttemptNotHeld
            run_id = str(adder["run_id"])
            await _lock_run(conn, run_id)
            cur = await conn.execute(queries["select_run_step_names"], {"run_id": run_id})
            existing = [
                ExistingStep(name=r["name"], status=r["status"], depends_on=list(r["depends_on"]))
                for r in await cur.fetchall()
            ]
            spec = parse_added_steps(
                steps,
                adder=adder["name"],
                existing=existing,
                max_steps=max_steps,
                remote_tools=tools,
                in_child_run=bool(adder["in_child_run"]),
            )
            await conn.execute(
                queries["insert_added_steps"],
                {
                    "run_id": run_id,
                    "steps": spec.steps_json(),
                    "priority": adder["priority"],
                    "done": [e.name for e in existing if e.status == "succeeded"],
                    "adder_id": step_id,
                    "adder_name": adder["name"],
                    "attempt": adder["attempt"],
                    "token": token,
                    "worker_id": worker_id,
                },
            )
            rows = await _complete_statement(conn, [(step_id, token, output_json)], worker_id)
            if not any(r["id"] == step_id and not r["skipped"] for r in rows):
                raise _AttemptNotHeld  # the lock above makes this unreachable; never half
            skipped = [(r["id"], str(r["run_id"])) for r in rows if r["skipped"]]
            if skipped:
                await _settle_dependents(conn, skipped, are_dead=False, already_counted=True)
    except RETRYABLE:
        raise  # the caller retries the whole transaction
    except REFUSED_WRITE as exc:  # Postgres refused a row: the attempt fails, as complete_step
        raise await _refuse_success(conn, step_id, token, exc, worker_id=worker_id) from None
    except ValidationFailed as exc:
        error = added_steps_error(exc.problems)
        logger.warning("step %s attempt with token %s: %s", step_id, token, error)
        await _fail_refused(conn, step_id, token, error, worker_id=worker_id)
        raise StepsRefused(f"step {step_id}: {error}", problems=exc.problems) from None
    except _AttemptNotHeld:
        state = await _lease_state(conn, step_id)
        if state is not None and state["lease_token"] == token:
            if state["status"] == "succeeded":  # an ambiguous commit that landed
                return AddedSteps(names=await _added_names(conn, step_id, token))
            if state["status"] == "dead_letter":
                raise StepsRefused(f"step {step_id}: its added steps were refused") from None
        raise LeaseLost(_lease_lost_message(step_id, token, state)) from None
    return AddedSteps(names=[s.name for s in spec.steps])


class _AttemptNotHeld(Exception):
    """Inside `complete_adding_steps`: the guard matched nothing (rolls the transaction back)."""


def added_steps_error(problems: list[dict[str, str | None]]) -> str:
    """The error of an attempt whose added steps were refused: the problems as a 422 body
    says them, ``added steps refused: {"error": "invalid_request", "problems": [...]}``."""
    body = {"error": "invalid_request", "problems": problems}
    return "added steps refused: " + json.dumps(body, ensure_ascii=False)


async def _fail_refused(
    conn: Conn, step_id: int, token: int, error: str, *, worker_id: str
) -> None:
    """Fail the attempt whose added steps were refused, not retryably; a lease lost
    meanwhile (or the same failure recorded before an ambiguous commit) is left as is."""
    try:
        await fail_attempt(
            conn,
            step_id,
            token,
            error=error,
            retryable=False,
            worker_id=worker_id,
            backoff_base_ms=0,
            backoff_cap_ms=0,
        )
    except LeaseLost as lost:
        state = await _lease_state(conn, step_id)
        if state is None or state["status"] != "dead_letter" or state["lease_token"] != token:
            raise lost from None


async def _added_names(conn: Conn, step_id: int, token: int) -> list[str]:
    cur = await conn.execute(queries["select_steps_added"], {"id": step_id, "token": token})
    row = await cur.fetchone()
    return list(row["steps"]) if row is not None and row["steps"] is not None else []


# What a completion statement raises when Postgres (or psycopg, before sending) refuses one
# of its rows: any database error that is not a connection loss or a lost race (`RETRYABLE`,
# retried by the caller as a whole), and the UnicodeEncodeError of text psycopg cannot encode.
REFUSED_WRITE = (psycopg.Error, UnicodeError)


async def record_successes(
    conn: Conn,
    results: list[tuple[int, int, str]],
    *,
    worker_id: str,
    may_skip: bool = True,
) -> dict[int, PgdagError | None]:
    """Record a batch of successes ``[(step_id, token, output_json_text), ...]`` in one
    statement (`complete_steps`) and say what became of each: ``{step_id: None}`` when it is
    recorded, ``{step_id: LeaseLost(reason)}`` when its lease was lost, ``{step_id:
    OutputRefused(error)}`` when Postgres refused its row and the attempt was failed.

    A group write that fails with a statement error (not a connection loss: `RETRYABLE`
    propagates, for the caller to retry the batch) is rolled back as a whole and its rows are
    written again one by one, each in its own statement, so one bad row never costs the
    others; a row that still fails is failed, not retryably, with the database's error.
    Like `complete_step`, safe to call again after an ambiguous commit: a step found
    ``succeeded`` under the same token counts as recorded."""
    try:
        recorded = await complete_steps(conn, results, worker_id=worker_id, may_skip=may_skip)
    except RETRYABLE:
        raise
    except REFUSED_WRITE as exc:
        logger.warning(
            "group write of %d successes refused (%s); recording them one by one",
            len(results),
            _refusal(exc),
        )
        return await _record_one_by_one(conn, results, worker_id=worker_id, may_skip=may_skip)
    outcome: dict[int, PgdagError | None] = {r[0]: None for r in results if r[0] in recorded}
    missing = [r for r in results if r[0] not in recorded]
    if missing:
        outcome.update(await _not_recorded(conn, [(r[0], r[1]) for r in missing]))
    return outcome


async def _record_one_by_one(
    conn: Conn, results: list[tuple[int, int, str]], *, worker_id: str, may_skip: bool
) -> dict[int, PgdagError | None]:
    outcome: dict[int, PgdagError | None] = {}
    for step_id, token, text in results:
        try:
            recorded = await complete_steps(
                conn, [(step_id, token, text)], worker_id=worker_id, may_skip=may_skip
            )
        except RETRYABLE:
            raise
        except REFUSED_WRITE as exc:
            outcome[step_id] = await _refuse_success(conn, step_id, token, exc, worker_id=worker_id)
            continue
        if step_id in recorded:
            outcome[step_id] = None
        else:
            outcome.update(await _not_recorded(conn, [(step_id, token)]))
    return outcome


async def _not_recorded(conn: Conn, leases: list[tuple[int, int]]) -> dict[int, PgdagError | None]:
    """For attempts a completion did not match: None when the step is ``succeeded`` under
    the same token (an ambiguous commit that landed), else `LeaseLost`."""
    cur = await conn.execute(queries["steps_lease_state"], {"ids": [i for i, _ in leases]})
    states = {row["id"]: row for row in await cur.fetchall()}
    outcome: dict[int, PgdagError | None] = {}
    for step_id, token in leases:
        state = states.get(step_id)
        if state is not None and state["status"] == "succeeded" and state["lease_token"] == token:
            outcome[step_id] = None
        else:
            outcome[step_id] = LeaseLost(_lease_lost_message(step_id, token, state))
    return outcome


async def _refuse_success(
    conn: Conn, step_id: int, token: int, exc: BaseException, *, worker_id: str
) -> PgdagError:
    """The success of (step_id, token) was refused by `exc`: fail the attempt, not
    retryably, with the database's error. Returns the `OutputRefused` to report, or the
    `LeaseLost` when the attempt was no longer ours to fail."""
    error = f"output refused by Postgres: {_refusal(exc)}"
    logger.warning("step %s attempt with token %s: %s", step_id, token, error)
    try:
        await fail_attempt(
            conn,
            step_id,
            token,
            error=error,
            retryable=False,
            worker_id=worker_id,
            backoff_base_ms=0,
            backoff_cap_ms=0,
        )
    except LeaseLost as lost:
        state = await _lease_state(conn, step_id)
        if state is None or state["status"] != "dead_letter" or state["lease_token"] != token:
            return lost
        # else a retry after an ambiguous commit: this very failure was recorded already
    return OutputRefused(f"step {step_id}: {jsonb.storable_text(error)}")


def _refusal(exc: BaseException) -> str:
    """The database's own words for `exc`: primary message and detail, without the query
    context (which may quote the refused text at length)."""
    diag = getattr(exc, "diag", None)
    primary = diag.message_primary if diag is not None else None
    if not primary:
        return str(exc).strip() or type(exc).__name__
    detail = diag.message_detail if diag is not None else None
    return f"{primary} ({detail.rstrip('.')})" if detail else primary


async def fail_attempt(
    conn: Conn,
    step_id: int,
    token: int,
    *,
    error: str,
    retryable: bool,
    worker_id: str,
    backoff_base_ms: int,
    backoff_cap_ms: int,
) -> FailOutcome:
    """Record a failed attempt: back to ``ready`` after an exponential backoff with full
    jitter when `retryable`, attempts remain and the step is idempotent (an ``"idempotent":
    false`` step is never re-run automatically), else ``dead_letter`` (its dependents are
    skipped and the run settles). Raises `LeaseLost` when the token is not current.

    `error` is stored in text and jsonb columns, which refuse NUL and lone surrogates: they
    are written as visible escapes (`engine.jsonb.storable_text`)."""
    error = jsonb.storable_text(error)
    async with conn.transaction():
        cur = await conn.execute(
            queries["fail_attempt"],
            {
                "id": step_id,
                "token": token,
                "error": error,
                "retryable": retryable,
                "worker_id": worker_id,
                "backoff_base_ms": backoff_base_ms,
                "backoff_cap_ms": backoff_cap_ms,
            },
        )
        row = await cur.fetchone()
        if row is None:
            state = await _lease_state(conn, step_id)
            raise LeaseLost(_lease_lost_message(step_id, token, state))
        if row["status"] == "dead_letter":
            await _after_dead_letters(conn, [(row["id"], str(row["run_id"]))])
    return FailOutcome(
        status=row["status"], available_at=row["available_at"], backoff_ms=row["delay_ms"]
    )


async def release_steps(conn: Conn, leases: list[tuple[int, int]], *, worker_id: str) -> int:
    """Hand back attempts on shutdown: idempotent steps to ``ready`` at once (attempt
    unspent), ``"idempotent": false`` ones to ``dead_letter``. Returns how many were
    released; leases no longer current are ignored."""
    if not leases:
        return 0
    async with conn.transaction():
        cur = await conn.execute(
            queries["release_steps"],
            {
                "ids": [i for i, _ in leases],
                "tokens": [t for _, t in leases],
                "worker_id": worker_id,
            },
        )
        rows = await cur.fetchall()
        dead = [(r["id"], str(r["run_id"])) for r in rows if r["status"] == "dead_letter"]
        if dead:
            await _after_dead_letters(conn, dead)
    return len(rows)


@dataclass(frozen=True)
class Reaped:
    """What one reaper pass did: `expired` is ``(tool, new_status)`` of each step whose
    lease expired (``ready``: requeued; ``dead_letter``), `promoted` the parked steps made
    ready, `signalled` the wait steps that took a signal sent before they were reached,
    `timed_out` the wait steps whose deadline passed (waiting again, or dead-lettered)."""

    expired: list[tuple[str, str]]
    promoted: int
    signalled: int = 0
    timed_out: int = 0

    @property
    def total(self) -> int:
        """Steps requeued, dead-lettered, made ready, signalled or timed out."""
        return len(self.expired) + self.promoted + self.signalled + self.timed_out


async def reap_expired_leases(conn: Conn, *, limit: int = 1000) -> Reaped | None:
    """The reaper's pass: requeue (or dead-letter) running steps whose lease expired, and
    make ready up to `limit` parked steps whose time has come (a run's startAt, a step's
    delayMs: `promote_due_steps`), oldest wake time first. Wait steps are never made ready:
    first the signals kept for wait steps that now wait are delivered (each in its own
    transaction), then the wait steps past their deadline are timed out
    (`time_out_wait_steps`: wait again, or dead_letter with their dependents settled).

    Only the maintenance leader calls it (`engine.maintenance`); a transaction-scoped
    advisory lock keeps two passes apart while the lead changes hands, and the transaction
    may sit idle 5 s at most (a process frozen in the pass loses its session instead of
    holding the lock). Returns None when another pass holds the lock, else what was done
    (`Reaped`).
    """
    # Kept signals first (a signal that came before its step's deadline beats the timeout),
    # each in a transaction of its own that locks like a worker's success (the step, its
    # dependents, the run): not inside the pass's transaction, whose earlier statements hold
    # run rows a worker's completion may be waiting behind.
    signalled = await _deliver_early_signals(conn, limit=limit)
    async with conn.transaction():
        cur = await conn.execute(queries["reaper_try_lock"])
        lock = await cur.fetchone()
        if lock is None or not lock["acquired"]:
            return None
        cur = await conn.execute(queries["reap_expired_leases"], {"limit": limit})
        rows = await cur.fetchall()
        dead = [(r["id"], str(r["run_id"])) for r in rows if r["status"] == "dead_letter"]
        if dead:
            await _after_dead_letters(conn, dead)
        cur = await conn.execute(queries["time_out_wait_steps"], {"limit": limit})
        timed_out = await cur.fetchall()
        dead = [(r["id"], str(r["run_id"])) for r in timed_out if r["status"] == "dead_letter"]
        if dead:
            await _after_dead_letters(conn, dead)
        cur = await conn.execute(queries["promote_due_steps"], {"limit": limit})
        due = await cur.fetchone()
    return Reaped(
        expired=[(r["tool"], r["status"]) for r in rows],
        promoted=int(due["n"]) if due else 0,
        signalled=signalled,
        timed_out=len(timed_out),
    )


@dataclass(frozen=True)
class SignalOutcome:
    """What ``POST /runs/{runId}/signals/{signal}`` did: the signal as recorded (`id` is its
    signal id, `payload` its JSON, `received_at` on the database clock), `created` False for
    a repeated signal id (the original is returned, nothing written), and `consumed_by` the
    wait step that took it (None: kept until the step is reached), with `step_status` what
    became of that step (``succeeded``; ``dead_letter`` for a rejected approval)."""

    id: str
    signal: str
    payload: Any
    received_at: datetime
    created: bool
    consumed_by: str | None
    step_status: str | None


async def send_signal(
    conn: Conn, run_id: str, signal: str, *, signal_id: str, payload_json: str
) -> SignalOutcome:
    """Record signal `signal` for run `run_id` once per `signal_id` (an idempotency key) and,
    when its wait step waits (parked: its dependencies done), complete that step with the
    payload as its output in the same transaction: its dependents are decided and its run
    settled exactly as for a worker's success (`complete_steps`). An approval whose payload
    has ``"approved": false`` is rejected instead: its attempt fails without retry
    (``dead_letter``, dependents skipped by their trigger rules). A signal sent before its
    step is reached is kept, and the maintenance leader's pass delivers it once the step
    waits (`reap_expired_leases`). `payload_json` is the payload's JSON text (an object).

    Returns a `SignalOutcome` (for a repeated `signal_id`: the original, even if the run has
    finished since). Raises `NotFound` for an unknown run; `IllegalTransition` when the run
    has finished, no step of it waits for `signal`, or that step has already ended.
    """
    async with conn.transaction():
        cur = await conn.execute(
            queries["select_signal"], {"run_id": run_id, "signal_id": signal_id}
        )
        known = await cur.fetchone()
        if known is not None:
            return _repeat(known)
        cur = await conn.execute(queries["select_wait_step"], {"run_id": run_id, "signal": signal})
        target = await cur.fetchone()
        if target is None:
            raise NotFound(f"no run {run_id}")
        if target["run_status"] in TERMINAL_RUN_STATES:
            raise IllegalTransition(f"run {run_id} is already {target['run_status']}")
        if target["id"] is None:
            raise IllegalTransition(f"no step of run {run_id} waits for signal {signal!r}")
        if target["status"] in TERMINAL_STEP_STATES:
            raise IllegalTransition(
                f"step {target['name']!r}, which waits for signal {signal!r}, is already "
                f"{target['status']}"
            )
        cur = await conn.execute(
            queries["insert_signal"],
            {"run_id": run_id, "signal": signal, "signal_id": signal_id, "payload": payload_json},
        )
        row = await cur.fetchone()
        if row is None:  # the same id sent concurrently: the first one recorded it
            cur = await conn.execute(
                queries["select_signal"], {"run_id": run_id, "signal_id": signal_id}
            )
            known = await cur.fetchone()
            if known is None:
                raise IllegalTransition(f"signal id {signal_id!r} conflict; send again")
            return _repeat(known)
        delivered = await _deliver(conn, run_id, row)
        if delivered is None:  # not waiting now: reached later, or ended under us (timeout)
            cur = await conn.execute(
                queries["select_wait_step"], {"run_id": run_id, "signal": signal}
            )
            now = await cur.fetchone()
            if now is not None and now["status"] in TERMINAL_STEP_STATES:
                raise IllegalTransition(  # rolls back the signal: it was not taken
                    f"step {now['name']!r}, which waits for signal {signal!r}, is already "
                    f"{now['status']}"
                )
    return SignalOutcome(
        id=row["signal_id"],
        signal=row["name"],
        payload=row["payload"],
        received_at=row["received_at"],
        created=True,
        consumed_by=delivered[0] if delivered else None,
        step_status=delivered[1] if delivered else None,
    )


def _repeat(known: DictRow) -> SignalOutcome:
    return SignalOutcome(
        id=known["signal_id"],
        signal=known["name"],
        payload=known["payload"],
        received_at=known["received_at"],
        created=False,
        consumed_by=known["consumed_by"],
        step_status=None,
    )


async def _deliver(conn: Conn, run_id: str, signal: DictRow) -> tuple[str, str] | None:
    """Inside a transaction: give `signal` (a signals row) to its wait step if that step
    waits now (`take_wait_step`), then end the step's attempt under the fencing token that
    statement made: success with the payload, or for an approval whose payload says
    ``"approved": false``, a failure without retry. Returns ``(step name, new status)``, or
    None when the step does not wait now (the signal stays unconsumed)."""
    owner = f"signal:{signal['signal_id']}"
    cur = await conn.execute(
        queries["take_wait_step"],
        {
            "run_id": run_id,
            "signal": signal["name"],
            "signal_id": signal["signal_id"],
            "owner": owner,
        },
    )
    step = await cur.fetchone()
    if step is None:
        return None
    await conn.execute(queries["consume_signal"], {"id": signal["id"], "step_id": step["id"]})
    payload = signal["payload"]
    if step["approval"] and isinstance(payload, dict) and payload.get("approved") is False:
        reason = payload.get("reason")
        error = f"rejected by signal {signal['name']!r} (id {signal['signal_id']})"
        if isinstance(reason, str) and reason:
            error += f": {reason}"
        await fail_attempt(
            conn,
            step["id"],
            step["lease_token"],
            error=error,
            retryable=False,
            worker_id=owner,
            backoff_base_ms=0,
            backoff_cap_ms=0,
        )
        return step["name"], "dead_letter"
    recorded = await complete_steps(
        conn,
        [(step["id"], step["lease_token"], json.dumps(payload))],
        worker_id=owner,
        may_skip=True,
    )
    if step["id"] not in recorded:  # the token was made in this transaction: cannot happen
        raise IllegalTransition(f"step {step['name']!r} refused its signal")
    return step["name"], "succeeded"


async def _deliver_early_signals(conn: Conn, *, limit: int) -> int:
    """The maintenance leader's pass: deliver up to `limit` signals that came before their
    wait step was reached and whose step now waits (`signals_to_deliver`), each in its own
    transaction (a step that a signal or the timeout took meanwhile is left alone). Returns
    how many steps took one."""
    cur = await conn.execute(queries["signals_to_deliver"], {"limit": limit})
    delivered = 0
    for signal in await cur.fetchall():
        async with conn.transaction():
            if await _deliver(conn, str(signal["run_id"]), signal) is not None:
                delivered += 1
    return delivered


async def prune_finished_runs(conn: Conn, *, retention_s: float, limit: int = 100) -> int:
    """Retention: delete up to `limit` runs that finished (completed, failed or cancelled)
    more than `retention_s` seconds ago, with their steps and edges. Returns how many runs
    were deleted. Unfinished runs are never touched. Their audit rows go with their day's
    audit_log partition (`engine.retention.maintain_audit_partitions`), not here."""
    async with conn.transaction():
        cur = await conn.execute(
            queries["prune_finished_runs"], {"retention_s": retention_s, "limit": limit}
        )
        return len(await cur.fetchall())


async def cancel_run(conn: Conn, run_id: str, *, reason: str) -> int:
    """Cancel a run that has not finished: every unfinished step becomes ``cancelled``
    (running attempts lose their lease at once). Returns the number of steps cancelled.

    Raises `NotFound` for an unknown run, `IllegalTransition` for a finished one.
    """
    async with conn.transaction():
        run = await _lock_run(conn, run_id)
        if run["status"] in TERMINAL_RUN_STATES:
            raise IllegalTransition(f"run {run_id} is already {run['status']}")
        cur = await conn.execute(queries["cancel_run_steps"], {"run_id": run_id, "reason": reason})
        counted = await cur.fetchone()
        await conn.execute(queries["cancel_run"], {"run_id": run_id, "reason": reason})
        # Its unfinished child runs (steps of kind run), in the same transaction, audited
        # with a reason naming the parent; one level: a child cannot have children.
        cur = await conn.execute(queries["select_unfinished_child_runs"], {"run_id": run_id})
        for child in await cur.fetchall():
            why = f"parent run {run_id} cancelled: {reason}"
            await conn.execute(queries["cancel_run_steps"], {"run_id": child["id"], "reason": why})
            await conn.execute(queries["cancel_run"], {"run_id": child["id"], "reason": why})
    return int(counted["n"]) if counted else 0


# The lease owner of a step of kind run while its child runs: the maintenance leader, not a
# worker (no worker registers it: a worker id is never this).
CHILD_RUN_OWNER = "pgdag:child-runs"


async def start_child_runs(
    conn: Conn,
    *,
    limit: int,
    max_steps: int,
    remote_tools: Callable[[], Awaitable[frozenset[str]]],
    backoff_base_ms: int,
    backoff_cap_ms: int,
) -> int:
    """Start the child runs of up to `limit` due steps of kind run (ready, tool ``$run``),
    each in one transaction: its child run inserted (the template with its ``$param``s
    replaced by the step's resolved input, `engine.dag.child_run_spec`; idempotency key
    ``pgdag-child:<runId>:<step>:<attempt>:<token>``) and linked to it, and the step claimed
    (ready -> running) with that fencing token by `CHILD_RUN_OWNER`, audited. A crash before
    the commit leaves neither; a step another pass holds is skipped (SKIP LOCKED).

    A step whose references cannot be resolved, or whose substituted template is refused
    (`max_steps`, `remote_tools`: as for ``POST /runs``), is claimed and its attempt failed
    (not retryable: dead letter) with the reason, in the same transaction; `remote_tools`
    is awaited (once, only when a step is due) for the tools of live workers and agents.
    Returns the steps started (or so failed)."""
    cur = await conn.execute(queries["select_due_child_steps"], {"limit": limit, "id": None})
    due = [r["id"] for r in await cur.fetchall()]
    if not due:
        return 0
    live_tools = await remote_tools()
    n = 0
    for step_id in due:
        async with conn.transaction():
            cur = await conn.execute(queries["select_due_child_steps"], {"limit": 1, "id": step_id})
            row = await cur.fetchone()
            if row is None:  # taken or changed since the first look
                continue
            cur = await conn.execute(queries["next_lease_token"])
            token_row = await cur.fetchone()
            assert token_row is not None
            token = int(token_row["token"])
            resolved: dict[str, Any] = row["resolved_input"] or {}
            attempt = int(row["attempt"]) + 1
            error: str | None = resolved.get("error")
            child_id: str | None = None
            if error is None:
                params = resolved.get("input")
                key = f"{CHILD_RUN_KEY_PREFIX}{row['run_id']}:{row['name']}:{attempt}:{token}"
                try:
                    spec = child_run_spec(
                        row["child_template"],
                        params if isinstance(params, dict) else {},
                        idempotency_key=key,
                        goal=f"{row['goal']} / {row['name']}".strip(" /"),
                        max_steps=max_steps,
                        remote_tools=live_tools,
                    )
                except ValidationFailed as exc:
                    error = "child run refused: " + "; ".join(
                        f"{'step ' + str(p['step']) + ': ' if p.get('step') else ''}"
                        f"{p['field']}: {p['problem']}"
                        for p in exc.problems
                    )
                else:
                    child_id, _ = await create_run(conn, spec)
                    await conn.execute(
                        queries["link_child_run"],
                        {
                            "child_run_id": child_id,
                            "parent_run_id": row["run_id"],
                            "parent_step_id": step_id,
                        },
                    )
            cur = await conn.execute(
                queries["start_child_run_step"],
                {
                    "id": step_id,
                    "attempt": row["attempt"],
                    "token": token,
                    "owner": CHILD_RUN_OWNER,
                    "child_run_id": child_id,
                    "resolved_input": json.dumps(resolved),
                },
            )
            if await cur.fetchone() is None:  # locked above: cannot happen; roll it all back
                raise IllegalTransition(f"step {step_id} is no longer ready")
            if error is not None:
                await fail_attempt(
                    conn,
                    step_id,
                    token,
                    error=error,
                    retryable=False,
                    worker_id=CHILD_RUN_OWNER,
                    backoff_base_ms=backoff_base_ms,
                    backoff_cap_ms=backoff_cap_ms,
                )
            else:
                logger.info(
                    "child run %s started for step %s of run %s (attempt %d)",
                    child_id,
                    row["name"],
                    row["run_id"],
                    attempt,
                )
        n += 1
    return n


async def finish_child_runs(
    conn: Conn, *, limit: int, backoff_base_ms: int, backoff_cap_ms: int, max_output_bytes: int
) -> int:
    """End the attempts of up to `limit` steps of kind run whose child run has ended, each
    under its fencing token, as a worker would (`complete_steps`, `fail_attempt`: the same
    guards, audit rows and dependents' decisions):

    - child ``completed``: the step succeeds with ``{"runId": <child>, "outputs": {<child
      step>: <its output>}}`` (every succeeded step of the child but map children; a
      ``$ref`` downstream reads ``steps.<step>.output.outputs.<child step>...``);
    - child ``failed``: the attempt fails, retryable (a new attempt starts a fresh child),
      with the child's first dead letter as the error;
    - child ``cancelled``: the attempt fails, not retryable (dead letter: a person stopped
      it; retry the step by hand to run a fresh child).

    An output past `max_output_bytes` fails the attempt instead (not retryable). A step
    that is no longer running under that token (cancelled meanwhile) is left alone.
    Returns the steps ended."""
    cur = await conn.execute(queries["select_finished_child_steps"], {"limit": limit})
    n = 0
    for r in await cur.fetchall():
        step_id, token, child = r["id"], r["lease_token"], str(r["child_run_id"])
        error: str | None = None
        retryable = False
        if r["child_status"] == "completed":
            try:
                text = output_json(
                    {"runId": child, "outputs": r["child_outputs"]}, max_bytes=max_output_bytes
                )
            except ValueError as exc:
                error = f"child run {child} completed, but its outputs cannot be stored: {exc}"
            else:
                done = await complete_steps(
                    conn, [(step_id, token, text)], worker_id=CHILD_RUN_OWNER, may_skip=True
                )
                n += len(done)
                continue
        elif r["child_status"] == "failed":
            error, retryable = f"child run {child} failed: {r['child_error']}", True
        else:
            error = f"child run {child} was cancelled"
        try:
            await fail_attempt(
                conn,
                step_id,
                token,
                error=error,
                retryable=retryable,
                worker_id=CHILD_RUN_OWNER,
                backoff_base_ms=backoff_base_ms,
                backoff_cap_ms=backoff_cap_ms,
            )
        except LeaseLost:
            continue
        n += 1
    return n


async def retry_dead_letter(conn: Conn, run_id: str, step_name: str, *, reason: str) -> None:
    """Put a ``dead_letter`` step back to ``ready`` with its attempts reset; its dependents
    that are waiting or were skipped are decided again by their trigger rules (a skipped one
    that no other dead letter blocks returns to ``pending``), and a failed run is running
    again. Audited as ``step_retried`` / ``step_unskipped`` / ``run_resumed`` with `reason`.

    Raises `NotFound` for an unknown run or step, `IllegalTransition` when the step is not
    in ``dead_letter`` or the run was cancelled.
    """
    async with conn.transaction():
        run, steps, edges, seed = await _reset_target(
            conn, run_id, step_name, refusal="its steps cannot be retried"
        )
        if seed.status != "dead_letter":
            raise IllegalTransition(
                f"step {step_name!r} is {seed.status}, not dead_letter; "
                "only dead-lettered steps can be retried"
            )
        plan, dropped = plan_reset(
            steps.values(),
            edges,
            [seed.id],
            follow=frozenset({"pending", "skipped"}),
            force_ready=True,
            delayed=bool(run["delayed"]),
            reexpand=False,
        )
        assert not dropped  # a retry follows only waiting and skipped steps
        events = ["step_retried" if r.id == seed.id else "step_unskipped" for r in plan]
        await _write_reset(conn, plan, events, reason=reason, from_step=step_name)
        await conn.execute(
            queries["recount_run"],
            {"run_id": run_id, "event": "run_resumed", "reason": reason, "from_step": step_name},
        )


async def replay_from(conn: Conn, run_id: str, step_name: str, *, reason: str) -> int:
    """Replay a run from `step_name`: that step and everything downstream of it are reset
    (attempts, outputs and errors cleared) and decided again by their trigger rules, while
    the steps upstream keep their outputs, which the replayed steps' references read again.
    A map step in the reset expands again (its old children are deleted), unless the replay
    starts at one of its children. Audited as ``step_replayed`` and ``run_replayed`` with
    `reason`. Returns how many steps were reset.

    Raises `NotFound` for an unknown run or step; `IllegalTransition` when the run was
    cancelled or a step to reset is running (it would be pulled from under its worker:
    wait for it, or cancel the run).
    """
    async with conn.transaction():
        run, steps, edges, seed = await _reset_target(
            conn, run_id, step_name, refusal="it cannot be replayed"
        )
        plan, dropped = plan_reset(
            steps.values(),
            edges,
            [seed.id],
            follow=None,
            force_ready=False,
            delayed=bool(run["delayed"]),
        )
        busy = [steps[r.id] for r in plan if steps[r.id].status == "running"]
        busy += [steps[i] for i in dropped if steps[i].status == "running"]
        if busy:
            names = ", ".join(repr(b.name) for b in busy[:5])
            raise IllegalTransition(
                f"cannot replay from {step_name!r}: {len(busy)} step(s) to reset are running "
                f"({names}); wait for them to finish, or cancel the run"
            )
        if dropped:
            await conn.execute(
                queries["delete_map_children"],
                {"ids": [r.id for r in plan if r.unexpand], "run_id": run_id},
            )
        await _write_reset(
            conn, plan, ["step_replayed"] * len(plan), reason=reason, from_step=step_name
        )
        await conn.execute(
            queries["recount_run"],
            {"run_id": run_id, "event": "run_replayed", "reason": reason, "from_step": step_name},
        )
    return len(plan)


async def _reset_target(
    conn: Conn, run_id: str, step_name: str, *, refusal: str
) -> tuple[DictRow, dict[int, GraphStep], list[tuple[int, int]], GraphStep]:
    """Inside a reset's transaction: lock the run and its steps, and find the step named.
    Raises `NotFound`, or `IllegalTransition` (with `refusal`) for a cancelled run."""
    run = await _lock_run(conn, run_id)
    if run["status"] == "cancelled":
        raise IllegalTransition(f"run {run_id} is cancelled; {refusal}")
    steps, edges = await _run_graph(conn, run_id)
    seed = next((st for st in steps.values() if st.name == step_name), None)
    if seed is None:
        raise NotFound(f"run {run_id} has no step {step_name!r}")
    return run, steps, edges, seed


async def _run_graph(conn: Conn, run_id: str) -> tuple[dict[int, GraphStep], list[tuple[int, int]]]:
    cur = await conn.execute(queries["select_run_graph"], {"run_id": run_id})
    steps = {
        r["id"]: GraphStep(
            id=r["id"],
            name=r["name"],
            status=r["status"],
            run_if=r["run_if"],
            is_map=r["is_map"],
            map_width=r["map_width"],
            map_parent_id=r["map_parent_id"],
            delay_ms=r["delay_ms"],
            waits=r["waits"],
        )
        for r in await cur.fetchall()
    }
    cur = await conn.execute(queries["select_run_edges"], {"run_id": run_id})
    edges = [(r["parent_id"], r["child_id"]) for r in await cur.fetchall()]
    return steps, edges


async def _write_reset(
    conn: Conn,
    plan: list[ResetStep],
    events: list[str],
    *,
    reason: str,
    from_step: str,
) -> None:
    await conn.execute(
        queries["reset_steps"],
        {
            "ids": [r.id for r in plan],
            "statuses": [r.status for r in plan],
            "remaining": [r.remaining for r in plan],
            "failed": [r.failed for r in plan],
            "events": events,
            "unexpand": [r.unexpand for r in plan],
            "reason": reason,
            "from_step": from_step,
        },
    )


async def select_dead_letters(
    conn: Conn,
    *,
    tool: str | None,
    run_status: str | None,
    since: datetime | None,
    until: datetime | None,
    limit: int,
) -> list[tuple[str, str]]:
    """Dead letters matching a bulk-retry filter, oldest first: ``[(run_id, step_name)]``."""
    cur = await conn.execute(
        queries["select_dead_letters"],
        {"tool": tool, "run_status": run_status, "since": since, "until": until, "limit": limit},
    )
    return [(str(r["run_id"]), r["name"]) for r in await cur.fetchall()]


@dataclass(frozen=True)
class MapExpansion:
    """What `expand_map` did: `width` children created, or the `problem` that stopped it
    (nothing written; the attempt must fail, not retryable)."""

    width: int | None
    problem: str | None


async def expand_map(
    conn: Conn, step_id: int, token: int, *, worker_id: str, max_width: int
) -> MapExpansion:
    """Expand a claimed map step into one ready child per element of its source (at most
    `max_width`); the step then waits for them. Raises `LeaseLost` when the token is not
    current."""
    async with conn.transaction():
        cur = await conn.execute(
            queries["expand_map"],
            {"id": step_id, "token": token, "worker_id": worker_id, "max_width": max_width},
        )
        row = await cur.fetchone()
        if row is None:
            state = await _lease_state(conn, step_id)
            raise LeaseLost(_lease_lost_message(step_id, token, state))
    return MapExpansion(width=row["width"], problem=row["problem"])


async def _after_dead_letters(conn: Conn, dead: list[tuple[int, str]]) -> None:
    """Inside the dead-lettering transaction: settle the dependents and each run."""
    await _settle_dependents(conn, dead, are_dead=True, already_counted=False)


async def _settle_dependents(
    conn: Conn, ended: list[tuple[int, str]], *, are_dead: bool, already_counted: bool
) -> None:
    """Inside the transaction that ended `ended` (``[(step_id, run_id)]``) without success:
    count their dependents down by their trigger rules, level by level while that skips
    more (`fail_dependents`), then settle each run with every step that ended here.

    `are_dead`: `ended` are dead letters (counted on the run as such), else skipped steps.
    `already_counted`: the statement that ended `ended` counted them on the run already
    (complete_steps' skips); only the steps skipped here are then counted.
    """
    finished: dict[str, int] = {}
    dead_per_run: dict[str, int] = {}
    for _, run_id in ended:
        if not already_counted:
            finished[run_id] = finished.get(run_id, 0) + 1
        if are_dead:
            dead_per_run[run_id] = dead_per_run.get(run_id, 0) + 1
    level = [step_id for step_id, _ in ended]
    while level:
        cur = await conn.execute(queries["fail_dependents"], {"ids": level})
        level = []
        for row in await cur.fetchall():
            if row["status"] == "skipped":
                run_id = str(row["run_id"])
                finished[run_id] = finished.get(run_id, 0) + 1
                level.append(row["id"])
    for run_id in sorted(set(finished) | set(dead_per_run)):
        n_finished = finished.get(run_id, 0)
        n_dead = dead_per_run.get(run_id, 0)
        if n_finished == 0 and n_dead == 0:
            continue
        await conn.execute(
            queries["settle_run"], {"run_id": run_id, "finished": n_finished, "dead": n_dead}
        )


async def _lock_run(conn: Conn, run_id: str) -> DictRow:
    cur = await conn.execute(queries["lock_run"], {"run_id": run_id})
    run = await cur.fetchone()
    if run is None:
        raise NotFound(f"no run {run_id}")
    return run


def _require_autocommit(conn: Conn) -> None:
    """Single-statement transitions run without BEGIN/COMMIT: on a connection that is not
    in autocommit mode they would be left uncommitted, so refuse it (every pool from
    `engine.db.open_pool` is autocommit)."""
    if not conn.autocommit:
        raise ValueError("pgdag transitions need an autocommit connection (engine.db.open_pool)")


async def _lease_state(conn: Conn, step_id: int) -> DictRow | None:
    cur = await conn.execute(queries["step_lease_state"], {"id": step_id})
    return await cur.fetchone()


def _lease_lost_message(step_id: int, token: int, state: DictRow | None) -> str:
    if state is None:
        return f"step {step_id} no longer exists"
    if state["lease_token"] != token:
        return (
            f"step {step_id}: lease token {token} is stale (current {state['lease_token']}, "
            f"status {state['status']})"
        )
    if state["status"] != "running":
        return f"step {step_id}: attempt with token {token} was ended ({state['status']})"
    if state["lease_live"]:  # token current and live: the write's lease_owner guard refused it
        return f"step {step_id}: the lease with token {token} is held by another worker"
    return f"step {step_id}: lease with token {token} expired"


def output_json(output: Any, *, max_bytes: int = jsonb.MAX_BYTES_DEFAULT) -> str:
    """Serialise a tool's output for the jsonb ``output`` column (`engine.jsonb.dumps`).

    `max_bytes` caps the JSON text (``PGDAG_MAX_OUTPUT_BYTES``). Raises `UnstorableJson`
    (a `ValueError`) naming the problem and its path, e.g. ``output.body.items[3].name:
    lone surrogate \\ud800 cannot be stored in Postgres jsonb``: the attempt must then fail,
    not retryably; never RecursionError.
    """
    return jsonb.dumps(output, path="output", max_bytes=max_bytes)


# --- schedules (migration 0012, engine.schedules) --------------------------------------------
#
#   create_schedule --> active --pause_schedule--> paused --resume_schedule--> active
#                         |  ^                                 (next fire: the first after now)
#     fire_due_schedule   +--+ (the leader: runs + fires + next_fire_at, one transaction)
#   delete_schedule: either state --> gone (its fires with it; its runs stay)


@dataclass(frozen=True)
class ScheduleFired:
    """What one `fire_due_schedule` did: the schedule (`schedule_id`, `name`), each fire
    ``(fire_at, run_id or None, created)`` oldest first (`created` False: the run of that
    idempotency key already existed; None: the template was refused, see `errors`), the fire
    times the policy left unfired (`missed`) and the schedule's new `next_fire_at`."""

    schedule_id: str
    name: str
    fires: list[tuple[datetime, str | None, bool]]
    missed: int
    errors: list[str]
    next_fire_at: datetime


async def _lock_schedule(conn: Conn, ref: str) -> DictRow:
    cur = await conn.execute(queries["lock_schedule"], {"id": schedules.id_of(ref), "name": ref})
    row = await cur.fetchone()
    if row is None:
        raise NotFound(f"no schedule {ref}")
    return row


async def create_schedule(conn: Conn, spec: schedules.ScheduleSpec) -> tuple[str, bool]:
    """Insert `spec` with its first fire time (the first after the database's now() in its
    zone). Returns ``(schedule_id, created)``: `created` False when a schedule of that name
    with the same definition exists (returned instead; nothing written). Raises
    `ScheduleNameTaken` when the name is taken by a schedule with another definition."""
    async with conn.transaction():
        cur = await conn.execute(queries["schedule_now"])
        now_row = await cur.fetchone()
        assert now_row is not None
        first = schedules.next_fire(spec.cron, spec.timezone, now_row["now"])
        cur = await conn.execute(
            queries["insert_schedule"],
            {
                "name": spec.name,
                "cron": spec.cron,
                "timezone": spec.timezone,
                "template": json.dumps(spec.template),
                "policy": spec.policy,
                "catch_up": spec.catch_up,
                "next_fire_at": first,
            },
        )
        row = await cur.fetchone()
        if row is not None:
            return str(row["id"]), True
        cur = await conn.execute(queries["select_schedule"], {"id": None, "name": spec.name})
        existing = await cur.fetchone()
        if existing is None:  # deleted between the two statements
            raise IllegalTransition(f"schedule {spec.name} changed meanwhile; submit again")
        same = {
            "cron": existing["cron"],
            "timezone": existing["timezone"],
            "template": existing["template"],
            "policy": existing["missed_policy"],
            "catch_up": existing["catch_up_limit"],
        } == spec.definition()
        if not same:
            raise ScheduleNameTaken(
                f"schedule name {spec.name!r} is taken by schedule {existing['id']} with "
                "another definition; delete it first or pick another name"
            )
        return str(existing["id"]), False


async def pause_schedule(conn: Conn, ref: str) -> str:
    """Active -> paused (by id or name); returns its id. Raises `NotFound`, or
    `IllegalTransition` when it is paused already."""
    async with conn.transaction():
        row = await _lock_schedule(conn, ref)
        cur = await conn.execute(queries["pause_schedule"], {"id": row["id"]})
        if await cur.fetchone() is None:
            raise IllegalTransition(f"schedule {row['name']} is already paused")
    return str(row["id"])


async def resume_schedule(conn: Conn, ref: str) -> str:
    """Paused -> active (by id or name), its next fire the first fire time after the
    database's now(): what passed while it was paused is not fired. Returns its id. Raises
    `NotFound`, or `IllegalTransition` when it is not paused."""
    async with conn.transaction():
        row = await _lock_schedule(conn, ref)
        if not row["paused"]:
            raise IllegalTransition(f"schedule {row['name']} is not paused")
        nxt = schedules.next_fire(row["cron"], row["timezone"], row["now"])
        cur = await conn.execute(queries["resume_schedule"], {"id": row["id"], "next_fire_at": nxt})
        if await cur.fetchone() is None:
            raise IllegalTransition(f"schedule {row['name']} is not paused")
    return str(row["id"])


async def delete_schedule(conn: Conn, ref: str) -> str:
    """Delete a schedule (by id or name) and its fires; the runs it submitted stay. Returns
    its id. Raises `NotFound`. A fire in progress finishes first (the row lock)."""
    async with conn.transaction():
        row = await _lock_schedule(conn, ref)
        cur = await conn.execute(queries["delete_schedule"], {"id": row["id"]})
        if await cur.fetchone() is None:
            raise NotFound(f"no schedule {ref}")
    return str(row["id"])


def _fire_spec(
    row: DictRow, fire_at: datetime, *, max_steps: int
) -> tuple[RunSpec | None, str | None]:
    """The run of one fire, or the reason the template is refused now (``max_steps``
    lowered since...). Tools are not looked up: they were checked at create time, and the
    leader may be a process that has not loaded them (their inputs' schemas are checked when
    this process has the tool)."""
    body = schedules.fire_body(
        row["template"], name=row["name"], schedule_id=str(row["id"]), fire_at=fire_at
    )
    steps = body.get("steps")
    tools = frozenset(
        s["tool"] for s in steps or () if isinstance(s, dict) and isinstance(s.get("tool"), str)
    )
    try:
        return parse_run(body, max_steps=max_steps, remote_tools=tools), None
    except ValidationFailed as exc:
        return None, str(exc)


async def fire_due_schedule(
    conn: Conn, *, max_steps: int, skip: Sequence[str] = ()
) -> ScheduleFired | None:
    """The maintenance leader's step: lock one due schedule (not paused, next fire time
    passed on the database clock; SKIP LOCKED; not one of the ids in `skip`), submit a run
    for each fire time its policy fires (`schedules.due_fires`; idempotency key
    ``schedule:<id>:<fire time>``), record each fire (unique per schedule and fire time;
    each run created gets a ``schedule_fired`` audit row naming the schedule and the fire
    time) and move ``next_fire_at`` on, all in one transaction. None when no schedule is due.

    A template refused at fire time records the fire with its error and no run. Raises
    `IllegalTransition` when a guarded write matches nothing (the transaction is rolled back:
    nothing fired), `ScheduleNotFireable` naming a schedule whose fire times cannot be
    computed (a zone tzdata no longer knows), and psycopg's errors."""
    async with conn.transaction():
        cur = await conn.execute(queries["lock_due_schedule"], {"skip": list(skip)})
        row = await cur.fetchone()
        if row is None:
            return None
        sid = str(row["id"])
        try:
            due = schedules.due_fires(
                row["cron"],
                row["timezone"],
                next_fire_at=row["next_fire_at"],
                now=row["now"],
                catch_up=row["catch_up_limit"],
            )
        except ValueError as exc:
            raise ScheduleNotFireable(sid, str(exc)) from None
        fires: list[tuple[datetime, str | None, bool]] = []
        errors: list[str] = []
        for i, fire_at in enumerate(due.fire_at):
            spec, error = _fire_spec(row, fire_at, max_steps=max_steps)
            run_id: str | None = None
            created = False
            if spec is not None:
                try:
                    run_id, created = await create_run(conn, spec)
                except IdempotencyKeyReused as exc:  # a client took the key: say so
                    error = str(exc)
            if error is not None:
                errors.append(error)
            cur = await conn.execute(
                queries["record_schedule_fire"],
                {
                    "id": sid,
                    "fire_at": fire_at,
                    "run_id": run_id,
                    "missed": due.missed if i == 0 else 0,
                    "error": error,
                    "created": created,
                    "name": row["name"],
                },
            )
            if await cur.fetchone() is None:
                # Fired already (next_fire_at was set back by hand): its run is the one of
                # that idempotency key, returned above, so nothing new was written for it.
                continue
            fires.append((fire_at, run_id, created))
        cur = await conn.execute(
            queries["advance_schedule"],
            {"id": sid, "next_fire_at": due.next_fire_at, "expected": row["next_fire_at"]},
        )
        if await cur.fetchone() is None:
            raise IllegalTransition(f"schedule {sid} changed while it fired")
    return ScheduleFired(
        schedule_id=sid,
        name=row["name"],
        fires=fires,
        missed=due.missed,
        errors=errors,
        next_fire_at=due.next_fire_at,
    )
