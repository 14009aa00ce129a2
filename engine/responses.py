"""The API's response bodies as pydantic models: what every route of `engine.api` returns.

These models only *describe* the wire format, for the OpenAPI document (`engine.openapi`);
the hot path never re-serialises through them. The shapes they describe are built in:

- `engine.store.run_json` (a run's head, also each item of ``GET /runs``), plus
  ``stepCounts`` in `engine.store._read_run_json`;
- ``select_run_steps_json`` in ``engine/sql/queries.sql`` (every step of a run, built by
  Postgres, including ``waitingFor``);
- `engine.store.event_json` (audit-log rows), `engine.store.Store.list_workers` and
  ``list_workers`` in queries.sql (``currentSteps``);
- the routes of `engine.api` (list envelopes, bulk retry, health, errors).

Every key is always present (``null`` when unset), so every field is required; extra keys
are forbidden, so the fuzz test (tests/integration/test_fuzz_api.py) fails if a shape grows
a key that this module does not document. Timestamps are RFC 3339 strings with an offset
(Postgres's JSON rendering of ``timestamptz``, or `datetime.isoformat`).
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal
from uuid import UUID

from pydantic import BaseModel, ConfigDict, Field
from pydantic.alias_generators import to_camel

RunStatus = Literal["pending", "running", "completed", "failed", "cancelled"]
StepStatus = Literal[
    "pending", "ready", "running", "succeeded", "dead_letter", "skipped", "cancelled"
]
RunIf = Literal["all_succeeded", "all_done", "any_failed"]
WorkerStatus = Literal["running", "stopping", "stopped"]

JsonValue = Any
"""Any JSON value (a jsonb column: a tool's output, an event's detail)."""


class Wire(BaseModel):
    """A response body: snake_case fields, camelCase keys, every key required, none extra."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid")


# --- errors --------------------------------------------------------------------------------


class Problem(Wire):
    """One problem of a refused request: the step (None when the problem is not a step's),
    the field (a dotted path such as ``input.ms``, or ``body``) and what is wrong."""

    step: str | None
    field: str
    problem: str


class Error(Wire):
    """Every error: a stable machine code (``not_found``, ``illegal_transition``,
    ``invalid_request``, ``unauthorized``, ``database_unavailable``...), a sentence for a
    person, and for a refused request every problem found."""

    error: str
    message: str
    problems: list[Problem] | None = Field(
        default=None, description="present on 422: each problem, naming the step and field"
    )


# --- health --------------------------------------------------------------------------------


class Health(Wire):
    """``GET /health`` when Postgres answers."""

    status: Literal["ok"]


class HealthUnavailable(Wire):
    """``GET /health`` when Postgres does not answer (503)."""

    status: Literal["unavailable"]
    error: str


# --- runs ----------------------------------------------------------------------------------


class RunSummary(Wire):
    """A run's head (`engine.store.run_json`): an item of ``GET /runs``."""

    id: UUID
    goal: str
    status: RunStatus
    idempotency_key: str | None
    steps_total: int
    steps_unfinished: int
    steps_dead_letter: int
    priority: int
    start_at: datetime | None
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    updated_at: datetime


class WaitingRunning(Wire):
    """Running: which worker holds the lease, and until when."""

    reason: Literal["running"]
    worker: str
    lease_expires_at: datetime


class WaitingChildRun(Wire):
    """A step of kind run: its child run `run_id` is running (the step ends when it does), or
    null: the step is ready and the maintenance leader starts its child next."""

    reason: Literal["childRun"]
    run_id: UUID | None


class WaitingMapChildren(Wire):
    """A map step waiting for its children (`remaining` of `width` unfinished)."""

    reason: Literal["mapChildren"]
    remaining: int
    width: int


class WaitingDependencies(Wire):
    """Pending on dependencies: the unfinished ones, named."""

    reason: Literal["dependencies"]
    steps: list[str]


class WaitingStartAt(Wire):
    """A root of a run submitted with ``startAt``, waiting until then."""

    reason: Literal["startAt"]
    until: datetime


class WaitingDelay(Wire):
    """A step with ``delayMs`` whose dependencies are done, parked in Postgres (no lease, no
    worker slot) until `until`; the maintenance leader makes it ready then."""

    reason: Literal["delay"]
    until: datetime
    delay_ms: int


class WaitingSignal(Wire):
    """A wait step whose dependencies are done (a root: its run started), waiting for
    `signal` (``POST /runs/{runId}/signals/{signal}``) until `deadline`, when the
    maintenance leader fails the attempt; an `approval` is shown with Approve / Reject."""

    reason: Literal["signal"]
    signal: str
    deadline: datetime
    approval: bool


class StepWait(Wire):
    """A wait step's wait, as submitted (``"wait"``)."""

    signal: str
    timeout_s: int
    approval: bool


class SignalReceived(Wire):
    """``POST /runs/{runId}/signals/{signal}``: the signal as recorded. `id` is its signal id
    (the ``Idempotency-Key`` header, or one generated), `consumed_by` the wait step it
    completed (null: kept until that step is reached, then the maintenance leader delivers
    it within one reaper interval) and `step_status` what became of that step in this request
    (``succeeded``; ``dead_letter`` for a rejected approval; null for a repeat or a kept
    signal)."""

    run_id: str
    id: str
    signal: str
    payload: JsonValue
    received_at: datetime
    repeated: bool = Field(
        description="true: this signal id was already received; the "
        "original is returned, nothing written"
    )
    consumed_by: str | None
    step_status: StepStatus | None


class WaitingBackoff(Wire):
    """Ready again after a failed attempt, not before `until`."""

    reason: Literal["backoff"]
    until: datetime
    attempt: int


class WaitingConcurrencyKey(Wire):
    """Ready, but its concurrency key already runs `max_concurrency` steps."""

    reason: Literal["concurrencyKey"]
    key: str
    running: int
    max_concurrency: int


class WaitingNoLiveWorker(Wire):
    """Ready, but no live worker has the tool."""

    reason: Literal["noLiveWorker"]
    tool: str


class WaitingQueued(Wire):
    """Ready and claimable: waiting for a worker to claim it."""

    reason: Literal["queued"]


WaitingFor = Annotated[
    WaitingRunning
    | WaitingChildRun
    | WaitingMapChildren
    | WaitingDependencies
    | WaitingStartAt
    | WaitingSignal
    | WaitingDelay
    | WaitingBackoff
    | WaitingConcurrencyKey
    | WaitingNoLiveWorker
    | WaitingQueued,
    Field(discriminator="reason"),
]


class Step(Wire):
    """A step as ``select_run_steps_json`` builds it (queries.sql)."""

    name: str
    tool: str
    input: dict[str, JsonValue]
    depends_on: list[str]
    run_if: RunIf
    status: StepStatus
    attempt: int
    max_attempts: int
    timeout_ms: int | None
    idempotent: bool
    idempotency_key: str = Field(description="<runId>:<stepName>, the same on every attempt")
    priority: int
    concurrency_key: str | None
    max_concurrency: int | None
    map: str | None = Field(description="a map step's source: the $ref path it fans out over")
    map_width: int | None
    map_index: int | None
    map_of: str | None = Field(description="a map child's map step")
    delay_ms: int | None = Field(
        description="milliseconds the step sleeps, parked, once its dependencies are done"
    )
    run: dict[str, JsonValue] | None = Field(
        description="a step of kind run: its child-run template (tool is then $run)"
    )
    child_run_id: UUID | None = Field(
        description="a step of kind run: the child run of its latest attempt"
    )
    wait: StepWait | None = Field(description="a wait step's signal and timeout")
    resolved_input: dict[str, JsonValue] | None = Field(
        description="the input with its references resolved, as the last attempt ran it"
    )
    available_at: datetime
    lease_owner: str | None
    lease_expires_at: datetime | None
    output: JsonValue
    error: str | None
    waiting_for: WaitingFor | None = Field(description="null once the step has ended")
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    updated_at: datetime


class Run(RunSummary):
    """A run with every step: ``GET /runs/{runId}`` and every route that changes a run."""

    parent_run_id: UUID | None = Field(
        description="a child run: the run whose step of kind run started it"
    )
    parent_step_name: str | None = Field(description="a child run: that step's name")

    step_counts: dict[StepStatus, int] = Field(description="how many steps are in each status")
    steps: list[Step]


class RunList(Wire):
    """``GET /runs``: a page of runs, newest first."""

    runs: list[RunSummary]
    next_cursor: str | None = Field(description="the `cursor` of the next page; null: last page")


# --- events --------------------------------------------------------------------------------


class Event(Wire):
    """An audit-log row (`engine.store.event_json`)."""

    id: int
    run_id: UUID
    step_name: str | None
    event: str
    from_status: str | None
    to_status: str | None
    attempt: int | None
    lease_token: int | None
    worker_id: str | None
    detail: JsonValue
    at: datetime


class EventList(Wire):
    """``GET /runs/{runId}/events``: the run's audit log, oldest first."""

    events: list[Event]


# --- bulk retry ----------------------------------------------------------------------------


class StepRef(Wire):
    """A step of a run."""

    run_id: UUID
    step_name: str


class RefusedStep(StepRef):
    """A dead letter that could not be retried, and why (retried or cancelled meanwhile)."""

    reason: str


class RetryDeadLettersResult(Wire):
    """``POST /runs/retry-dead-letters``: what matched, what was (or, dry, would be) retried."""

    dry_run: bool
    matched: int
    retried: list[StepRef]
    refused: list[RefusedStep]


# --- workers -------------------------------------------------------------------------------


class WorkerStep(Wire):
    """A step a worker holds the lease of."""

    run_id: UUID
    step_name: str
    attempt: int
    lease_expires_at: datetime


class Worker(Wire):
    """A registered worker (`engine.store.Store.list_workers`)."""

    id: str
    hostname: str
    pid: int
    concurrency: int
    tools: list[str]
    kind: Literal["database", "agent"] = Field(
        description="database: holds a DATABASE_URL; agent: reaches only the API"
    )
    restarts: int = Field(description="times its supervisor restarted this worker's slot")
    last_exit_code: int | None = Field(
        description="how the slot's previous process ended (negative: killed by that signal)"
    )
    status: WorkerStatus
    alive: bool = Field(description="not stopped, and a heartbeat within the lease TTL")
    started_at: datetime
    last_heartbeat_at: datetime
    stopped_at: datetime | None
    current_steps: list[WorkerStep]


class WorkerList(Wire):
    """``GET /workers``: registered workers, latest heartbeat first (at most 500)."""

    workers: list[Worker]


class MaintenanceRun(Wire):
    """A maintenance task's last run in this process."""

    started_at: datetime
    duration_s: float = Field(description="seconds the run took")
    result: int | None = Field(description="rows it acted on (steps, runs, workers); null: failed")
    error: str | None = Field(description="the exception of a failed run, else null")


class MaintenanceTask(Wire):
    """One task of the maintenance service (`engine.maintenance`)."""

    name: str = Field(description="reaper, pruner or liveness")
    interval_s: float = Field(description="seconds between the end of a run and the next")
    runs: int = Field(description="runs made while this process led")
    failures: int = Field(description="of which failed")
    last_run: MaintenanceRun | None


class MaintenanceLeader(Wire):
    """Who holds the maintenance lock now, as ``pg_locks`` shows it."""

    holder: str | None = Field(description="`api host:pid` or `worker <id>`")
    backend_pid: int = Field(description="the Postgres backend pid of its lock connection")


class Maintenance(Wire):
    """``GET /maintenance``: this process's maintenance service, and the current leader."""

    holder: str = Field(description="this process: `api host:pid`")
    role: Literal["standby", "leader", "stopped"]
    leader_since: datetime | None = Field(description="when this process took the lead")
    terms: int = Field(description="how many times this process took the lead")
    standby_interval_s: float = Field(description="a standby tries for the lead this often")
    tick_s: float = Field(description="the leader checks its lock connection this often")
    tasks: list[MaintenanceTask] = Field(
        description="last runs while this process led (see the leader's own logs otherwise)"
    )
    leader: MaintenanceLeader | None = Field(description="null: nobody leads right now")


# --- queue ---------------------------------------------------------------------------------


class QueueTool(Wire):
    """One tool's queue (the ``/metrics`` gauges of the same name, by tool)."""

    tool: str
    ready: int = Field(description="ready steps, including those waiting out a backoff")
    running: int
    oldest_ready_age_seconds: float = Field(
        description="age of the oldest ready step whose availableAt has come (0: none waits)"
    )
    dead_letter: int = Field(description="steps in dead_letter, waiting for a person")
    workers_live: int = Field(description="live workers and agents that have the tool")


class QueueRuns(Wire):
    """Unfinished runs by status."""

    pending: int
    running: int


class QueueMinute(Wire):
    """Steps succeeded in one minute."""

    minute: datetime = Field(description="the minute's start, UTC")
    succeeded: int


class QueueView(Wire):
    """``GET /queue``: the dashboard's queue view."""

    tools: list[QueueTool]
    runs: QueueRuns
    completions_per_minute: list[QueueMinute] = Field(
        description="the last 10 minutes, oldest first; the last is the current, partial "
        "minute. Counted by this API process since it started (its live listener reads "
        "every step_succeeded event): 0 for minutes before its start"
    )
    snapshot_age_seconds: float = Field(description="age of the queue numbers (cached 1 s)")


# --- schedules (engine.schedule_api, engine.store.schedule_json) ----------------------------


class ScheduleLastFire(Wire):
    """A schedule's latest fire: when, the run it submitted (None: the template was refused,
    see `error`), that run's status (None: no run, or pruned)."""

    fire_at: datetime
    run_id: UUID | None
    run_status: RunStatus | None
    error: str | None


class ScheduleFire(ScheduleLastFire):
    """One fire of ``GET /schedules/{scheduleId}``: also how many older fire times the
    missed-fire policy left unfired just before it, and when it was written."""

    missed: int
    fired_at: datetime


class ScheduleHead(Wire):
    """A schedule as submitted, its state and its next fire time (UTC; None while paused)."""

    id: UUID
    name: str
    cron: str
    timezone: str
    run: dict[str, JsonValue] = Field(description="the POST /runs body each fire submits")
    missed: Literal["skip"] | dict[str, int] = Field(
        description='"skip", or {"catchUp": N}: what a late pass fires'
    )
    paused: bool
    next_fire_at: datetime | None
    created_at: datetime
    updated_at: datetime
    fires: int = Field(description="how many fires it made")


class ScheduleSummary(ScheduleHead):
    """An item of ``GET /schedules``."""

    last_fire: ScheduleLastFire | None


class Schedule(ScheduleHead):
    """``GET /schedules/{scheduleId}``: the schedule and its latest fires, newest first."""

    recent_fires: list[ScheduleFire]


class ScheduleList(Wire):
    """``GET /schedules``: every schedule, by name."""

    schedules: list[ScheduleSummary]


class ScheduleDeleted(Wire):
    """``DELETE /schedules/{scheduleId}``: the schedule deleted (its runs stay)."""

    id: UUID
    deleted: Literal[True]
