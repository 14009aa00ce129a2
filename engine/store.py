"""`Store`: every database operation pgdag performs, on one connection pool.

Workers, the reaper and the API call these methods and contain no SQL. Status writes are
delegated to `engine.transitions`; reads and the worker registry live here. Transitions that
are safe to repeat are retried through connection loss (`engine.db.retrying`).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import psycopg
from psycopg.rows import DictRow
from psycopg_pool import AsyncConnectionPool

from engine import retention, schedules, transitions
from engine.dag import RunSpec
from engine.db import retrying
from engine.errors import NotFound, PgdagError
from engine.schedules import ScheduleSpec
from engine.sql import queries
from engine.tools import registered_tools
from engine.transitions import ClaimedStep, FailOutcome

Pool = AsyncConnectionPool[psycopg.AsyncConnection[DictRow]]
Conn = psycopg.AsyncConnection[DictRow]


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value is not None else None


def run_json(row: DictRow) -> dict[str, Any]:
    """A runs row as the API's camelCase JSON."""
    return {
        "id": str(row["id"]),
        "goal": row["goal"],
        "status": row["status"],
        "idempotencyKey": row["idempotency_key"],
        "stepsTotal": row["steps_total"],
        "stepsUnfinished": row["steps_unfinished"],
        "stepsDeadLetter": row["steps_dead"],
        "priority": row["priority"],
        "startAt": _iso(row["start_at"]),
        "createdAt": _iso(row["created_at"]),
        "startedAt": _iso(row["started_at"]),
        "finishedAt": _iso(row["finished_at"]),
        "updatedAt": _iso(row["updated_at"]),
    }


def event_json(row: DictRow) -> dict[str, Any]:
    """An audit_log row as the API's camelCase JSON."""
    return {
        "id": row["id"],
        "runId": str(row["run_id"]),
        "stepName": row["step_name"],
        "event": row["event"],
        "fromStatus": row["from_status"],
        "toStatus": row["to_status"],
        "attempt": row["attempt"],
        "leaseToken": row["lease_token"],
        "workerId": row["worker_id"],
        "detail": row["detail"],
        "at": _iso(row["created_at"]),
    }


def schedule_json(row: DictRow) -> dict[str, Any]:
    """A schedules row as the API's camelCase JSON (``missed``: ``"skip"`` or
    ``{"catchUp": N}``, as it was submitted)."""
    return {
        "id": str(row["id"]),
        "name": row["name"],
        "cron": row["cron"],
        "timezone": row["timezone"],
        "run": row["template"],
        "missed": "skip" if row["missed_policy"] == "skip" else {"catchUp": row["catch_up_limit"]},
        "paused": row["paused"],
        # While paused there is no next fire: a resume computes it from its own now().
        "nextFireAt": None if row["paused"] else _iso(row["next_fire_at"]),
        "createdAt": _iso(row["created_at"]),
        "updatedAt": _iso(row["updated_at"]),
    }


@dataclass(frozen=True)
class RunSnapshot:
    """A run read under one snapshot: `run` is the ``GET /runs/{id}`` body, `event_ids` the
    ids of the run's events visible to that snapshot, `max_event_id` the largest (0: none)."""

    run: dict[str, Any]
    event_ids: frozenset[int]
    max_event_id: int


@dataclass(frozen=True)
class LiveRead:
    """What one `read_live_events` call saw: audit `rows` in id order; `snap_xmin`, the oldest
    transaction id (xid8, as an int) still running when the rows were read; and, when asked
    for, `probe_xid`: a transaction id assigned after that snapshot, hence larger than the id
    of every transaction that had taken an audit id by then."""

    rows: list[DictRow]
    snap_xmin: int
    probe_xid: int | None
    # When the rows were read (clock_timestamp() of the database), for the LISTEN lag.
    read_at: datetime | None = None


@dataclass(frozen=True)
class StepState:
    """A step's `status` and current fencing token (None: never claimed), its `tool`,
    `running_s`: seconds since its current attempt was claimed (database clock; None: never
    started), and `lease_owner`: the worker holding the lease (None when not running)."""

    status: str
    lease_token: int | None
    tool: str
    running_s: float | None
    lease_owner: str | None = None


async def _read_run_json(conn: Conn, run_id: str, *, with_steps: bool, lease_ttl_s: float) -> str:
    """The run as JSON text: the head shaped here, the steps' JSON built by Postgres
    (``select_run_steps_json``) and spliced in, never decoded. Raises `NotFound`."""
    cur = await conn.execute(queries["select_run"], {"run_id": run_id})
    row = await cur.fetchone()
    if row is None:
        raise NotFound(f"no run {run_id}")
    run = run_json(row)
    # A child run (a step of kind run started it): its parent run and step (migration 0011).
    run["parentRunId"] = str(row["parent_run_id"]) if row["parent_run_id"] else None
    run["parentStepName"] = row["parent_step_name"]
    cur = await conn.execute(queries["select_run_status_counts"], {"run_id": run_id})
    run["stepCounts"] = {r["status"]: r["n"] for r in await cur.fetchall()}
    head = json.dumps(run, separators=(",", ":"))
    if not with_steps:
        return head
    cur = await conn.execute(
        queries["select_run_steps_json"], {"run_id": run_id, "lease_ttl_s": lease_ttl_s}
    )
    steps = await cur.fetchone()
    assert steps is not None and head.endswith("}")
    return f'{head[:-1]},"steps":{steps["steps"]}}}'


async def _read_run(
    conn: Conn, run_id: str, *, with_steps: bool, lease_ttl_s: float
) -> dict[str, Any]:
    """`_read_run_json`, decoded."""
    run: dict[str, Any] = json.loads(
        await _read_run_json(conn, run_id, with_steps=with_steps, lease_ttl_s=lease_ttl_s)
    )
    return run


async def setup_live_session(conn: Conn) -> None:
    """Session settings of the listener's dedicated connection (``live_session``: generic
    plans for the reads by id of the partitioned audit log)."""
    await conn.execute(queries["live_session"])


async def start_live(conn: Conn) -> tuple[int, int]:
    """For a new listener on `conn` (autocommit): ``(max_event_id, probe_xid)``, the newest
    visible audit id and a transaction id larger than that of any transaction that could
    hold a smaller audit id (see `LiveRead`)."""
    cur = await conn.execute(queries["live_start"])
    row = await cur.fetchone()
    assert row is not None
    return int(row["max_id"]), int(row["probe_xid"])


async def read_live_events(
    conn: Conn, *, known: int, gaps: Sequence[tuple[int, int]], limit: int, probe: bool
) -> LiveRead:
    """One read of the listener on `conn` (autocommit, one statement, one snapshot): up to
    `limit` audit rows with ``id > known`` plus every visible row inside the inclusive id
    ranges `gaps`; with `probe`, also a `LiveRead.probe_xid` (it costs a transaction id).
    See `engine.live` for why."""
    cur = await conn.execute(
        queries["live_fetch"],
        {
            "known": known,
            "limit": limit,
            "gap_lo": [lo for lo, _ in gaps],
            "gap_hi": [hi for _, hi in gaps],
            "probe": probe,
        },
    )
    rows = await cur.fetchall()
    first = rows[0]
    probe_xid = first["probe_xid"]
    return LiveRead(
        rows=[r for r in rows if r["id"] is not None],
        snap_xmin=int(first["snap_xmin"]),
        probe_xid=int(probe_xid) if probe_xid is not None else None,
        read_at=first["read_at"],
    )


class Store:
    """The one owner of database access, over `pool`.

    Every method may raise `psycopg.OperationalError` when Postgres stays unreachable past
    its retry deadline; transition methods raise the `engine.errors` documented on them.
    """

    def __init__(self, pool: Pool, *, lease_ttl_s: float) -> None:
        self.pool = pool
        self.lease_ttl_s = lease_ttl_s

    async def ping(self) -> None:
        """One round trip; raises when Postgres does not answer."""
        async with self.pool.connection(timeout=2) as conn:
            await conn.execute(queries["ping"])

    # --- transitions -------------------------------------------------------------------

    async def create_run(
        self, spec: RunSpec, *, trace_context: Mapping[str, str] | None = None
    ) -> tuple[str, bool]:
        """See `transitions.create_run`. Returns ``(run_id, created)``."""
        async with self.pool.connection() as conn:
            return await transitions.create_run(conn, spec, trace_context=trace_context)

    async def claim(
        self, worker_id: str, limit: int, tools: Sequence[str] | None = None
    ) -> list[ClaimedStep]:
        """Claim up to `limit` ready steps for `worker_id`, only of the tools named in
        `tools` (default: every tool registered in this process, `registered_tools()`).
        See `transitions.claim_steps`."""
        names = sorted(registered_tools()) if tools is None else tools
        async with self.pool.connection() as conn:
            return await transitions.claim_steps(
                conn,
                worker_id=worker_id,
                limit=limit,
                lease_ttl_s=self.lease_ttl_s,
                tools=names,
            )

    async def heartbeat(
        self, leases: list[tuple[int, int]], *, owner: str | None = None
    ) -> set[int]:
        """Extend leases ``[(step_id, token)]`` (only `owner`'s, when given); returns the
        step ids still held."""

        async def op() -> set[int]:
            async with self.pool.connection() as conn:
                return await transitions.heartbeat_leases(
                    conn, leases, lease_ttl_s=self.lease_ttl_s, owner=owner
                )

        return await retrying(op, what="lease heartbeat", deadline_s=self.lease_ttl_s)

    async def heartbeat_until(
        self, leases: list[tuple[int, int]], *, owner: str | None = None
    ) -> dict[int, datetime]:
        """Extend leases ``[(step_id, token)]`` (only `owner`'s, when given); returns
        ``{step_id: lease_expires_at}`` for the ones still held (see
        `transitions.heartbeat_leases_until`). Retried through connection loss for up to the
        lease TTL."""

        async def op() -> dict[int, datetime]:
            async with self.pool.connection() as conn:
                return await transitions.heartbeat_leases_until(
                    conn, leases, lease_ttl_s=self.lease_ttl_s, owner=owner
                )

        return await retrying(op, what="lease heartbeat", deadline_s=self.lease_ttl_s)

    async def complete(self, step: ClaimedStep, output_json: str, *, worker_id: str) -> None:
        """Record `step`'s success; retried through connection loss until the lease would
        have expired. Raises `LeaseLost` when the token is no longer current, and
        `OutputRefused` when Postgres refused the output (the attempt was then failed, not
        retryably, with the database's error)."""

        async def op() -> None:
            async with self.pool.connection() as conn:
                await transitions.complete_step(
                    conn,
                    step.id,
                    step.lease_token,
                    output_json,
                    worker_id=worker_id,
                    may_skip=step.may_skip_children,
                )

        await retrying(op, what=f"recording success of {step.name}", deadline_s=self.lease_ttl_s)

    async def complete_many(
        self, results: list[tuple[int, int, str]], *, worker_id: str, may_skip: bool = True
    ) -> dict[int, PgdagError | None]:
        """Record a batch of successes ``[(step_id, token, output_json_text)]`` in one
        statement, or one by one when Postgres refuses the batch; see
        `transitions.record_successes` for the result (None, `LeaseLost` or `OutputRefused`
        per step). Retried through connection loss until a lease would have expired."""

        async def op() -> dict[int, PgdagError | None]:
            async with self.pool.connection() as conn:
                return await transitions.record_successes(
                    conn, results, worker_id=worker_id, may_skip=may_skip
                )

        return await retrying(
            op, what=f"recording {len(results)} successes", deadline_s=self.lease_ttl_s
        )

    async def complete_adding_steps(
        self,
        step_id: int,
        token: int,
        output_json: str,
        steps: Any,
        *,
        worker_id: str,
        max_steps: int,
    ) -> transitions.AddedSteps:
        """Record a success that adds `steps` (a decoded JSON list of step objects) to its
        run, all or nothing (see `transitions.complete_adding_steps`); a step may use a tool
        loaded here or one a live worker or agent has. Retried through connection loss until
        the lease would have expired. Raises `LeaseLost`, or `StepsRefused` when the steps
        were refused (the attempt was failed, not retryably)."""
        remote = await self.live_worker_tools()

        async def op() -> transitions.AddedSteps:
            async with self.pool.connection() as conn:
                return await transitions.complete_adding_steps(
                    conn,
                    step_id,
                    token,
                    output_json,
                    steps,
                    worker_id=worker_id,
                    max_steps=max_steps,
                    tools=remote,
                )

        return await retrying(
            op,
            what=f"recording success of step {step_id} with added steps",
            deadline_s=self.lease_ttl_s,
        )

    async def fail(
        self,
        step: ClaimedStep,
        *,
        error: str,
        retryable: bool,
        worker_id: str,
        backoff_base_ms: int,
        backoff_cap_ms: int,
    ) -> FailOutcome:
        """Record `step`'s failed attempt (see `transitions.fail_attempt`)."""
        return await self.fail_lease(
            step.id,
            step.lease_token,
            error=error,
            retryable=retryable,
            worker_id=worker_id,
            backoff_base_ms=backoff_base_ms,
            backoff_cap_ms=backoff_cap_ms,
            what=step.name,
        )

    async def fail_lease(
        self,
        step_id: int,
        token: int,
        *,
        error: str,
        retryable: bool,
        worker_id: str,
        backoff_base_ms: int,
        backoff_cap_ms: int,
        what: str | None = None,
    ) -> FailOutcome:
        """Record the failed attempt of `step_id` under fencing `token` (what an agent
        reports: a bare pair, no `ClaimedStep`); see `transitions.fail_attempt`. Raises
        `LeaseLost` when the token is not current. Retried through connection loss until the
        lease would have expired (a repeat after an ambiguous commit raises `LeaseLost`)."""

        async def op() -> FailOutcome:
            async with self.pool.connection() as conn:
                return await transitions.fail_attempt(
                    conn,
                    step_id,
                    token,
                    error=error,
                    retryable=retryable,
                    worker_id=worker_id,
                    backoff_base_ms=backoff_base_ms,
                    backoff_cap_ms=backoff_cap_ms,
                )

        return await retrying(
            op,
            what=f"recording failure of {what or f'step {step_id}'}",
            deadline_s=self.lease_ttl_s,
        )

    async def release(self, leases: list[tuple[int, int]], *, worker_id: str) -> int:
        """Hand back attempts on shutdown (see `transitions.release_steps`)."""
        async with self.pool.connection(timeout=5) as conn:
            return await transitions.release_steps(conn, leases, worker_id=worker_id)

    async def reap(self) -> int | None:
        """One reaper pass; None when another process holds the reaper lock, else the number
        of steps requeued, dead-lettered or made ready."""
        reaped = await self.reap_detailed()
        return None if reaped is None else reaped.total

    async def reap_detailed(self) -> transitions.Reaped | None:
        """One reaper pass; None when another process holds the reaper lock, else what it
        did (see `transitions.reap_expired_leases`), for the reaper's metrics."""
        async with self.pool.connection() as conn:
            return await transitions.reap_expired_leases(conn)

    async def maintenance_work_due(self) -> dict[str, bool]:
        """The maintenance leader's look before a round (``maintenance_work_due``, one
        read-only statement): for each task that can be skipped (``reaper``, ``child_runs``,
        ``scheduler``), whether its pass has anything to take now."""
        async with self.pool.connection() as conn:
            cur = await conn.execute(queries["maintenance_work_due"])
            row = await cur.fetchone()
        return {name: bool(due) for name, due in (row or {}).items()}

    async def prune(self, *, retention_s: float, limit: int = 100) -> int:
        """One retention pass (see `transitions.prune_finished_runs`); runs deleted."""
        async with self.pool.connection() as conn:
            return await transitions.prune_finished_runs(conn, retention_s=retention_s, limit=limit)

    async def stale_workers(self, *, limit_s: float) -> list[dict[str, Any]]:
        """Workers not stopped whose last heartbeat is older than `limit_s` seconds (at most
        1000, longest silent first): id, kind, hostname, pid, last_heartbeat_at, silent_s."""
        async with self.pool.connection() as conn:
            cur = await conn.execute(queries["stale_workers"], {"limit_s": limit_s})
            return list(await cur.fetchall())

    async def maintenance_leader(self) -> dict[str, Any] | None:
        """Who holds the maintenance lock (`engine.maintenance`), seen in ``pg_locks``:
        ``application_name``, ``pid`` (its backend) and ``backend_start``; None when nobody
        does."""
        async with self.pool.connection() as conn:
            cur = await conn.execute(queries["maintenance_leader"])
            row = await cur.fetchone()
        return dict(row) if row else None

    async def maintain_audit_partitions(
        self,
        *,
        retention_days: float | None,
        ahead_days: int = retention.AHEAD_DAYS_DEFAULT,
    ) -> retention.AuditUpkeep:
        """One audit-log partition upkeep (see `retention.maintain_audit_partitions`)."""
        async with self.pool.connection() as conn:
            return await retention.maintain_audit_partitions(
                conn, retention_days=retention_days, ahead_days=ahead_days
            )

    async def cancel_run(self, run_id: str, *, reason: str = "cancelled by request") -> int:
        """Cancel a run (see `transitions.cancel_run`). Cancel locks the run before its
        steps, the reverse of the workers' order, so it may lose a deadlock: it is retried."""

        async def op() -> int:
            async with self.pool.connection() as conn:
                return await transitions.cancel_run(conn, run_id, reason=reason)

        return await retrying(op, what=f"cancelling run {run_id}", deadline_s=10)

    async def start_child_runs(
        self, *, limit: int, max_steps: int, backoff_base_ms: int, backoff_cap_ms: int
    ) -> int:
        """Start the child runs of due steps of kind run (see
        `transitions.start_child_runs`); returns the steps started or failed."""
        async with self.pool.connection() as conn:
            return await transitions.start_child_runs(
                conn,
                limit=limit,
                max_steps=max_steps,
                remote_tools=self.live_worker_tools,
                backoff_base_ms=backoff_base_ms,
                backoff_cap_ms=backoff_cap_ms,
            )

    async def finish_child_runs(
        self, *, limit: int, backoff_base_ms: int, backoff_cap_ms: int, max_output_bytes: int
    ) -> int:
        """End the steps of kind run whose child run ended (see
        `transitions.finish_child_runs`); returns the steps ended."""
        async with self.pool.connection() as conn:
            return await transitions.finish_child_runs(
                conn,
                limit=limit,
                backoff_base_ms=backoff_base_ms,
                backoff_cap_ms=backoff_cap_ms,
                max_output_bytes=max_output_bytes,
            )

    async def retry_step(
        self, run_id: str, step_name: str, *, reason: str = "manual retry"
    ) -> None:
        """Manually retry a dead-lettered step (see `transitions.retry_dead_letter`);
        retried after a deadlock like `cancel_run`."""

        async def op() -> None:
            async with self.pool.connection() as conn:
                await transitions.retry_dead_letter(conn, run_id, step_name, reason=reason)

        await retrying(op, what=f"retrying step {step_name} of run {run_id}", deadline_s=10)

    async def replay(self, run_id: str, step_name: str, *, reason: str) -> int:
        """Replay the run from `step_name` (see `transitions.replay_from`); returns how many
        steps were reset. Retried after a deadlock like `cancel_run`."""

        async def op() -> int:
            async with self.pool.connection() as conn:
                return await transitions.replay_from(conn, run_id, step_name, reason=reason)

        return await retrying(op, what=f"replaying run {run_id} from {step_name}", deadline_s=10)

    async def send_signal(
        self, run_id: str, signal: str, *, signal_id: str, payload_json: str
    ) -> transitions.SignalOutcome:
        """Send signal `signal` to run `run_id` (see `transitions.send_signal`): recorded once
        per `signal_id`, completing the step that waits for it. Retried after a deadlock or
        a lost connection like `cancel_run` (a repeat finds the signal recorded: the same
        outcome, `created` False). Raises `NotFound`, `IllegalTransition`."""

        async def op() -> transitions.SignalOutcome:
            async with self.pool.connection() as conn:
                return await transitions.send_signal(
                    conn, run_id, signal, signal_id=signal_id, payload_json=payload_json
                )

        return await retrying(op, what=f"signal {signal} to run {run_id}", deadline_s=10)

    async def dead_letters(
        self,
        *,
        tool: str | None,
        run_status: str | None,
        since: datetime | None,
        until: datetime | None,
        limit: int,
    ) -> list[tuple[str, str]]:
        """Dead letters matching a bulk-retry filter, oldest first: ``[(run_id, name)]``."""
        async with self.pool.connection() as conn:
            return await transitions.select_dead_letters(
                conn, tool=tool, run_status=run_status, since=since, until=until, limit=limit
            )

    async def expand_map(
        self, step: ClaimedStep, *, worker_id: str, max_width: int
    ) -> transitions.MapExpansion:
        """Expand a claimed map step (see `transitions.expand_map`); retried through
        connection loss until the lease would have expired (a repeat after an ambiguous
        commit finds the step no longer running and raises `LeaseLost`)."""

        async def op() -> transitions.MapExpansion:
            async with self.pool.connection() as conn:
                return await transitions.expand_map(
                    conn, step.id, step.lease_token, worker_id=worker_id, max_width=max_width
                )

        return await retrying(
            op, what=f"expanding map step {step.name}", deadline_s=self.lease_ttl_s
        )

    # --- workers registry ---------------------------------------------------------------

    async def register_worker(
        self,
        worker_id: str,
        *,
        hostname: str,
        pid: int,
        concurrency: int,
        tools: list[str],
        kind: str = "database",
        restarts: int = 0,
        last_exit_code: int | None = None,
    ) -> None:
        """Insert or refresh this worker's row in the workers table.

        `kind` is ``database`` or ``agent`` (a worker that reaches only the API, registered
        by the API for it); `restarts` and `last_exit_code` are what its supervisor told it
        (``python -m workers --processes N``): the times its slot was restarted and how the
        previous process ended (negative: the signal that killed it)."""
        async with self.pool.connection() as conn:
            await conn.execute(
                queries["register_worker"],
                {
                    "id": worker_id,
                    "hostname": hostname,
                    "pid": pid,
                    "concurrency": concurrency,
                    "tools": tools,
                    "kind": kind,
                    "restarts": restarts,
                    "last_exit_code": last_exit_code,
                },
            )

    async def worker_heartbeat(self, worker_id: str, *, status: str = "running") -> None:
        """Refresh the worker's ``last_heartbeat_at`` (database clock)."""
        async with self.pool.connection() as conn:
            await conn.execute(queries["worker_heartbeat"], {"id": worker_id, "status": status})

    async def agent_touch(self, agent_id: str) -> bool:
        """Refresh a registered agent's heartbeat (database clock). Returns False when no
        running agent of that id is registered (never registered, or stopped)."""
        async with self.pool.connection() as conn:
            cur = await conn.execute(queries["agent_touch"], {"id": agent_id})
            return await cur.fetchone() is not None

    async def live_worker_tools(self) -> frozenset[str]:
        """The tools of every live worker and agent (not stopped, heartbeat within the lease
        TTL)."""
        async with self.pool.connection() as conn:
            cur = await conn.execute(
                queries["live_worker_tools"], {"lease_ttl_s": self.lease_ttl_s}
            )
            row = await cur.fetchone()
        return frozenset(row["tools"]) if row is not None else frozenset()

    async def lease_states(self, step_ids: Sequence[int]) -> dict[int, tuple[str, int | None]]:
        """``{step_id: (status, lease_token)}`` for the steps that exist (read only): how an
        agent's report of an attempt already recorded is told apart from a stale one."""
        states = await self.step_states(step_ids)
        return {i: (s.status, s.lease_token) for i, s in states.items()}

    async def step_states(self, step_ids: Sequence[int]) -> dict[int, StepState]:
        """`StepState` of each step of `step_ids` that exists (read only, one statement on
        the primary key): its status, token, tool and how long it has run."""
        async with self.pool.connection() as conn:
            cur = await conn.execute(queries["steps_lease_state"], {"ids": list(step_ids)})
            return {
                r["id"]: StepState(
                    status=r["status"],
                    lease_token=r["lease_token"],
                    tool=r["tool"],
                    running_s=r["running_s"],
                    lease_owner=r["lease_owner"],
                )
                for r in await cur.fetchall()
            }

    async def failure_recorded(
        self, step_id: int, token: int, *, worker_id: str
    ) -> tuple[str, str | None] | None:
        """Whether `worker_id` already recorded the failure of attempt (`step_id`, `token`)
        (read only): ``(to_status, available_at_iso)`` of that failure (``ready`` with its
        retry time, or ``dead_letter`` and None), else None."""
        async with self.pool.connection() as conn:
            cur = await conn.execute(
                queries["attempt_failure_recorded"],
                {"id": step_id, "token": token, "worker_id": worker_id},
            )
            row = await cur.fetchone()
        return None if row is None else (row["to_status"], row["available_at"])

    async def success_recorded(self, step_id: int, token: int, *, worker_id: str) -> bool:
        """Whether `worker_id` recorded the success of attempt (`step_id`, `token`) (read
        only, from the audit log): a re-sent success is a duplicate only for its recorder."""
        async with self.pool.connection() as conn:
            cur = await conn.execute(
                queries["attempt_success_recorded"],
                {"id": step_id, "token": token, "worker_id": worker_id},
            )
            return await cur.fetchone() is not None

    async def worker_stopped(self, worker_id: str) -> None:
        """Mark the worker stopped."""
        async with self.pool.connection(timeout=5) as conn:
            await conn.execute(queries["worker_stopped"], {"id": worker_id})

    # --- reads --------------------------------------------------------------------------

    async def get_run(self, run_id: str, *, with_steps: bool = True) -> dict[str, Any]:
        """The run as JSON, with every step when `with_steps`; raises `NotFound`."""
        run: dict[str, Any] = json.loads(await self.get_run_json(run_id, with_steps=with_steps))
        return run

    async def get_run_json(self, run_id: str, *, with_steps: bool = True) -> str:
        """The run as JSON text (what `get_run` decodes), with every step when `with_steps`;
        the steps' JSON is built by Postgres (``select_run_steps_json``) and spliced in,
        never decoded. Raises `NotFound`."""
        async with self.pool.connection() as conn:
            return await _read_run_json(
                conn, run_id, with_steps=with_steps, lease_ttl_s=self.lease_ttl_s
            )

    async def run_snapshot(self, run_id: str) -> RunSnapshot:
        """The run exactly as ``GET /runs/{run_id}`` shows it, with the ids of the events that
        state includes, read in one REPEATABLE READ transaction (a single snapshot, so the
        two agree). Raises `NotFound`."""
        async with self.pool.connection() as conn, conn.transaction():
            await conn.execute(queries["live_begin_snapshot"])
            run = await _read_run(conn, run_id, with_steps=True, lease_ttl_s=self.lease_ttl_s)
            cur = await conn.execute(queries["live_run_event_ids"], {"run_id": run_id})
            ids = [r["id"] for r in await cur.fetchall()]
        return RunSnapshot(run=run, event_ids=frozenset(ids), max_event_id=max(ids, default=0))

    async def replay_events(
        self, run_id: str | None, *, after: int, upto: int, limit: int
    ) -> list[DictRow]:
        """Audit rows with ``after < id <= upto``, oldest first, at most `limit`: of one run,
        or of every run when `run_id` is None. Rows, not JSON: the caller shapes them with
        `event_json`. Raises `NotFound` for an unknown run."""
        async with self.pool.connection() as conn:
            if run_id is None:
                cur = await conn.execute(
                    queries["live_replay_events"], {"after": after, "upto": upto, "limit": limit}
                )
                return await cur.fetchall()
            cur = await conn.execute(queries["select_run"], {"run_id": run_id})
            if await cur.fetchone() is None:
                raise NotFound(f"no run {run_id}")
            cur = await conn.execute(
                queries["live_replay_run_events"],
                {"run_id": run_id, "after": after, "upto": upto, "limit": limit},
            )
            return await cur.fetchall()

    async def list_runs(
        self, *, status: str | None, limit: int, cursor: int | None
    ) -> tuple[list[dict[str, Any]], int | None]:
        """Runs newest first; returns ``(runs, next_cursor)`` (None on the last page)."""
        async with self.pool.connection() as conn:
            cur = await conn.execute(
                queries["list_runs"], {"status": status, "limit": limit, "cursor": cursor}
            )
            rows = await cur.fetchall()
        next_cursor = rows[-1]["seq"] if len(rows) == limit else None
        return [run_json(r) for r in rows], next_cursor

    async def list_events(
        self, run_id: str, *, after: int = 0, limit: int = 1000
    ) -> list[dict[str, Any]]:
        """The run's audit log, oldest first, ids > `after`; raises `NotFound`."""
        async with self.pool.connection() as conn:
            cur = await conn.execute(queries["select_run"], {"run_id": run_id})
            if await cur.fetchone() is None:
                raise NotFound(f"no run {run_id}")
            cur = await conn.execute(
                queries["list_run_events"], {"run_id": run_id, "after": after, "limit": limit}
            )
            return [event_json(r) for r in await cur.fetchall()]

    async def list_workers(self) -> list[dict[str, Any]]:
        """Registered workers with heartbeat, liveness and the steps they hold."""
        async with self.pool.connection() as conn:
            cur = await conn.execute(queries["list_workers"], {"lease_ttl_s": self.lease_ttl_s})
            rows = await cur.fetchall()
        return [
            {
                "id": r["id"],
                "hostname": r["hostname"],
                "pid": r["pid"],
                "concurrency": r["concurrency"],
                "tools": list(r["tools"]),
                "kind": r["kind"],
                "restarts": r["restarts"],
                "lastExitCode": r["last_exit_code"],
                "status": r["status"],
                "alive": r["alive"],
                "startedAt": _iso(r["started_at"]),
                "lastHeartbeatAt": _iso(r["last_heartbeat_at"]),
                "stoppedAt": _iso(r["stopped_at"]),
                "currentSteps": r["current_steps"],
            }
            for r in rows
        ]

    # --- schedules (migration 0012, engine.schedules) ------------------------------------

    async def create_schedule(self, spec: ScheduleSpec) -> tuple[str, bool]:
        """See `transitions.create_schedule`. Returns ``(schedule_id, created)``."""
        async with self.pool.connection() as conn:
            return await transitions.create_schedule(conn, spec)

    async def pause_schedule(self, ref: str) -> str:
        """See `transitions.pause_schedule` (`ref`: id or name); returns the id."""
        async with self.pool.connection() as conn:
            return await transitions.pause_schedule(conn, ref)

    async def resume_schedule(self, ref: str) -> str:
        """See `transitions.resume_schedule` (`ref`: id or name); returns the id."""
        async with self.pool.connection() as conn:
            return await transitions.resume_schedule(conn, ref)

    async def delete_schedule(self, ref: str) -> str:
        """See `transitions.delete_schedule` (`ref`: id or name); returns the id."""
        async with self.pool.connection() as conn:
            return await transitions.delete_schedule(conn, ref)

    async def fire_due_schedule(
        self, *, max_steps: int, skip: Sequence[str] = ()
    ) -> transitions.ScheduleFired | None:
        """See `transitions.fire_due_schedule`: one due schedule fired, or None."""
        async with self.pool.connection() as conn:
            return await transitions.fire_due_schedule(conn, max_steps=max_steps, skip=skip)

    async def list_schedules(self, *, limit: int) -> list[dict[str, Any]]:
        """Every schedule by name (at most `limit`), as the API's camelCase JSON, each with
        its latest fire (``lastFire``: time, run id, run status, error; None: never fired)."""
        async with self.pool.connection() as conn:
            cur = await conn.execute(queries["list_schedules"], {"limit": limit})
            rows = await cur.fetchall()
        out = []
        for r in rows:
            body = schedule_json(r)
            body["fires"] = r["fires"]
            body["lastFire"] = (
                None
                if r["last_fire_at"] is None
                else {
                    "fireAt": _iso(r["last_fire_at"]),
                    "runId": str(r["last_run_id"]) if r["last_run_id"] else None,
                    "runStatus": r["last_run_status"],
                    "error": r["last_error"],
                }
            )
            out.append(body)
        return out

    async def get_schedule(self, ref: str, *, fires: int = 20) -> dict[str, Any]:
        """One schedule (`ref`: id or name) as camelCase JSON with its latest `fires` fires,
        newest first (``recentFires``: fireAt, runId, runStatus, missed, error, firedAt) and
        how many it made (``fires``). Raises `NotFound`."""
        async with self.pool.connection() as conn:
            cur = await conn.execute(
                queries["select_schedule"], {"id": schedules.id_of(ref), "name": ref}
            )
            row = await cur.fetchone()
            if row is None:
                raise NotFound(f"no schedule {ref}")
            cur = await conn.execute(
                queries["list_schedule_fires"], {"id": row["id"], "limit": fires}
            )
            recent = await cur.fetchall()
            cur = await conn.execute(queries["count_schedule_fires"], {"id": row["id"]})
            count = await cur.fetchone()
        body = schedule_json(row)
        body["fires"] = count["n"] if count else 0
        body["recentFires"] = [
            {
                "fireAt": _iso(f["fire_at"]),
                "runId": str(f["run_id"]) if f["run_id"] else None,
                "runStatus": f["run_status"],
                "missed": f["missed"],
                "error": f["error"],
                "firedAt": _iso(f["fired_at"]),
            }
            for f in recent
        ]
        return body
