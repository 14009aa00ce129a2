"""`MaintenanceService`: one leader runs the maintenance tasks, every other process stands by.

Leadership is a SESSION advisory lock (``pg_try_advisory_lock``, queries
``maintenance_try_lock``) held on one dedicated connection of the leader's process::

    standby --(try the lock every PGDAG_MAINTENANCE_STANDBY_S: got it)--> leader
       ^                                                                     |
       +--(the lock connection fails its SELECT 1, or the service stops)----+

- The leader pings its lock connection each tick (``SELECT 1`` every `tick_s`: the shortest
  task interval, capped at the standby interval; also while a task runs) and runs each task
  when it is due, one after the other, through the process's pool (`Store`). A
  task's error is recorded and logged; the loop goes on.
- Before a round, one read-only statement (`Store.maintenance_work_due`) says which of the
  due tasks that may be skipped (`Task.skip_when_idle`: the reaper, the child runs, the
  scheduler) have anything to take; those that have not count a run that did nothing. An
  idle leader's second is that statement and the ping, where the three passes took twelve
  statements: it runs on the event loop of a worker that leads, beside its claims.
- The lock lives as long as the session. A leader killed with SIGKILL: the kernel closes its
  socket, Postgres ends the session at once and the lock is free; a standby takes it at its
  next try (at most PGDAG_MAINTENANCE_STANDBY_S later). A leader that froze (SIGSTOP, a
  blocked event loop) stops pinging: Postgres ends the idle session after `idle_timeout_s`
  (``idle_session_timeout`` on that session: max(5 s, 5 ticks); on a standby's connection,
  max(5 s, 2 standby intervals + 1 s), so a process that froze right after its try took the
  lock does not keep it either). A leader whose host vanished: Postgres's TCP
  keepalives (set on that session: 5 s idle, then 3 probes 2 s apart) end it.
- A leader that loses its connection steps down at once (its tasks stop), and tries again
  like any standby.
- `engine.metrics` gets each run (``pgdag_maintenance_last_run_*{task}``) and whether this
  process leads (``pgdag_maintenance_leader``).

The reaper keeps its own transaction lock (``reaper_try_lock``) as well: while the lead
changes hands, two passes never overlap.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime
from typing import Any, Literal

import psycopg
from psycopg.rows import DictRow, dict_row

from engine import metrics
from engine.config import Settings, check_interval
from engine.db import CONNECT_TIMEOUT_S, RETRYABLE
from engine.maintenance.task import Task, TaskRecord
from engine.sql import queries
from engine.store import Store

logger = logging.getLogger(__name__)

APPLICATION_NAME_PREFIX = "pgdag-maintenance "  # + holder, on the lock connection
IDLE_TIMEOUT_MIN_S = 5.0  # a frozen leader's session ends after max(this, 5 ticks) idle
PING_TIMEOUT_S = 5.0  # a ping slower than this counts as a lost connection

Role = Literal["standby", "leader", "stopped"]
Conn = psycopg.AsyncConnection[DictRow]


class LeadershipLost(Exception):
    """The leader's lock connection failed its check: the lock may be someone else's now."""


class MaintenanceService:
    """Leader election and the task loop of one process.

    `holder` names this process in logs, in ``pg_stat_activity.application_name`` of the lock
    connection and in `status` (``api host:pid``, ``worker <id>``). `tasks` run through
    `store`. `can_run` (optional) is asked before each try for the lead and each round as
    leader: False keeps this process out of the lead, or makes it step down (the API says no
    while the schema is not at head, so a worker that can run the tasks leads instead).
    `on_result(name, n)` is called after a run that returned n > 0 (a worker wakes its claim
    loop after the reaper requeued steps).

    Raises `ConfigError` naming ``PGDAG_MAINTENANCE_STANDBY_S`` for a standby interval that is
    not a finite number > 0 (task intervals are checked when the tasks are built).
    """

    def __init__(
        self,
        database_url: str,
        store: Store,
        settings: Settings,
        tasks: Sequence[Task],
        *,
        holder: str,
        can_run: Callable[[], Awaitable[bool]] | None = None,
        on_result: Callable[[str, int], None] | None = None,
    ) -> None:
        self.database_url = database_url
        self.store = store
        self.tasks = list(tasks)
        if len({t.name for t in self.tasks}) != len(self.tasks):
            raise ValueError("two maintenance tasks have the same name")
        self.holder = holder
        self.standby_s = check_interval(
            "PGDAG_MAINTENANCE_STANDBY_S", settings.maintenance_standby_s
        )
        intervals = [t.interval_s for t in self.tasks]
        self.tick_s = min([*intervals, self.standby_s])
        # Postgres ends the lock session after this long idle: a leader pings every tick, a
        # standby tries every standby interval. Set when the connection opens (so a process
        # that froze right after its try took the lock cannot keep it), tightened on leading.
        self.idle_timeout_s = max(IDLE_TIMEOUT_MIN_S, 5 * self.tick_s)
        self.standby_idle_timeout_s = max(IDLE_TIMEOUT_MIN_S, 2 * self.standby_s + 1)
        self.can_run = can_run
        self.on_result = on_result
        self.records: dict[str, TaskRecord] = {t.name: TaskRecord() for t in self.tasks}
        self.role: Role = "standby"
        self.leader_since: datetime | None = None
        self.terms = 0  # how many times this process took the lead
        self._conn: Conn | None = None
        self._failing = False  # the lock connection could not be opened (logged once)

    # --- the loop ---------------------------------------------------------------------

    async def run(self) -> None:
        """Stand by and lead, in turn, until cancelled; the lock connection is closed on the
        way out (so the lock is free at once for a standby)."""
        try:
            while True:
                if await self._may_run() and await self._try_lead():
                    assert self._conn is not None
                    try:
                        await self._lead(self._conn)
                    except LeadershipLost as exc:
                        logger.warning(
                            "maintenance: %s lost the lead (%s); standing by", self.holder, exc
                        )
                    except Exception:  # a bug must not end maintenance in this process
                        logger.exception("maintenance: %s stepped down", self.holder)
                    finally:
                        self.role = "standby"
                        self.leader_since = None
                        metrics.MAINTENANCE_LEADER.set(0)
                        await self._close()
                await asyncio.sleep(self.standby_s)
        finally:
            self.role = "stopped"
            self.leader_since = None
            metrics.MAINTENANCE_LEADER.set(0)
            await self._close()

    async def _may_run(self) -> bool:
        """`can_run`'s answer (True without one); an error in it counts as no."""
        if self.can_run is None:
            return True
        try:
            return await self.can_run()
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            logger.debug("maintenance: can_run failed: %s", exc)
            return False

    async def _connect(self) -> Conn:
        conn = await psycopg.AsyncConnection.connect(
            self.database_url,
            autocommit=True,
            row_factory=dict_row,
            connect_timeout=CONNECT_TIMEOUT_S,
            application_name=(APPLICATION_NAME_PREFIX + self.holder)[:63],
        )
        await conn.execute(
            queries["maintenance_session_guard"],
            {"idle_ms": round(self.standby_idle_timeout_s * 1000)},
        )
        return conn

    async def _try_once(self) -> bool:
        if self._conn is None or self._conn.closed:
            self._conn = await self._connect()
        cur = await self._conn.execute(queries["maintenance_try_lock"])
        row = await cur.fetchone()
        return bool(row and row["acquired"])

    async def _try_lead(self) -> bool:
        """One try for the lock on the dedicated connection (opened if needed; a connection
        that broke while standing by, say across a Postgres restart, is replaced in the same
        try); True when this process holds it now. Errors are logged once per outage."""
        try:
            try:
                acquired = await self._try_once()
            except psycopg.OperationalError:
                if self._conn is None:
                    raise  # could not connect: no second try
                await self._close()
                acquired = await self._try_once()
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            if not self._failing:
                logger.warning("maintenance: cannot reach postgres to stand for the lead: %s", exc)
            self._failing = True
            await self._close()
            return False
        if self._failing:
            logger.info("maintenance: postgres answers again")
            self._failing = False
        return acquired

    async def _lead(self, conn: Conn) -> None:
        """Run the tasks while the lock connection answers; raises `LeadershipLost` when it
        does not."""
        self.role = "leader"
        self.leader_since = datetime.now(UTC)
        self.terms += 1
        metrics.MAINTENANCE_LEADER.set(1)
        logger.info(
            "maintenance: %s leads (backend pid %d); tasks: %s",
            self.holder,
            conn.info.backend_pid,
            ", ".join(f"{t.name} every {t.interval_s:g}s" for t in self.tasks),
        )
        next_due = dict.fromkeys(self.records, time.monotonic())
        try:
            await conn.execute(
                queries["maintenance_session_guard"],
                {"idle_ms": round(self.idle_timeout_s * 1000)},
            )
        except psycopg.Error as exc:
            raise LeadershipLost(f"lock connection: {type(exc).__name__}: {exc}") from exc
        keeper = asyncio.create_task(self._keep(conn))
        try:
            while not keeper.done():
                if not await self._may_run():
                    # Let a candidate that can run the tasks lead instead.
                    raise LeadershipLost("this process cannot run the tasks now")
                now = time.monotonic()
                due = [t for t in self.tasks if next_due[t.name] <= now]
                idle = await self._idle_tasks(due)
                for task in due:
                    if keeper.done():
                        break  # lost the lock connection: stop at once
                    await self._run_task(task, skip=task.name in idle)
                # Each task's next run counts from the end of the round, not of its own run:
                # tasks of one interval stay in step, so the next round has one look for them
                # all (counted from each run's end, they fell due a few ms apart, and each
                # woke a round and a look of its own: three a second).
                ended = time.monotonic()
                for task in due:
                    next_due[task.name] = ended + task.interval_s
                pause = min(next_due.values()) - time.monotonic()
                await asyncio.wait({keeper}, timeout=min(max(pause, 0.0), self.tick_s))
            keeper.result()  # raises LeadershipLost
        finally:
            keeper.cancel()
            with contextlib.suppress(asyncio.CancelledError, LeadershipLost):
                await keeper

    async def _keep(self, conn: Conn) -> None:
        """Ping the lock connection every tick, also while a task runs (a long prune must
        not let ``idle_session_timeout`` end the session); raises `LeadershipLost`."""
        while True:
            await asyncio.sleep(self.tick_s)
            await self._ping(conn)

    async def _ping(self, conn: Conn) -> None:
        try:
            await asyncio.wait_for(conn.execute(queries["maintenance_ping"]), PING_TIMEOUT_S)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            raise LeadershipLost(f"lock connection: {type(exc).__name__}: {exc}") from exc

    async def _idle_tasks(self, due: Sequence[Task]) -> set[str]:
        """The names of the tasks in `due` that the one look (`Store.maintenance_work_due`)
        says have nothing to take now; made only when one of them may be skipped. An error
        in the look skips nothing (the tasks run, and record their own errors)."""
        if not any(t.skip_when_idle for t in due):
            return set()
        try:
            work = await self.store.maintenance_work_due()
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            logger.debug("maintenance: the look before a round failed: %s", exc)
            return set()
        return {t.name for t in due if t.skip_when_idle and work.get(t.name) is False}

    async def _run_task(self, task: Task, *, skip: bool = False) -> None:
        """One run of `task`, recorded (`records`, `engine.metrics`); `skip`: the look said
        it has nothing to take, so it counts as a run that did nothing (result 0)."""
        record = self.records[task.name]
        started_at = datetime.now(UTC)
        t0 = time.monotonic()
        try:
            result = 0 if skip else await task.run_once(self.store)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            record.started_at, record.duration_s = started_at, time.monotonic() - t0
            record.result, record.error = None, f"{type(exc).__name__}: {exc}".strip()[:1000]
            metrics.observe_maintenance_run(
                task.name,
                started_at_s=started_at.timestamp(),
                duration_s=record.duration_s,
                rows=None,
            )
            record.runs += 1
            record.failures += 1
            record.failing_since += 1
            if record.failing_since == 1:
                if isinstance(exc, RETRYABLE):
                    logger.warning("maintenance task %s failed: %s", task.name, record.error)
                else:
                    logger.exception("maintenance task %s failed", task.name)
            else:
                logger.debug("maintenance task %s failed again: %s", task.name, record.error)
            return
        record.started_at, record.duration_s = started_at, time.monotonic() - t0
        record.result, record.error = result, None
        record.runs += 1
        metrics.observe_maintenance_run(
            task.name,
            started_at_s=started_at.timestamp(),
            duration_s=record.duration_s,
            rows=result,
        )
        if record.failing_since:
            logger.info(
                "maintenance task %s works again after %d failed run(s)",
                task.name,
                record.failing_since,
            )
            record.failing_since = 0
        if result and self.on_result is not None:
            self.on_result(task.name, result)

    async def _close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(Exception):
                await conn.close()

    # --- what it says -----------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        """This process's view (camelCase, ``GET /maintenance``): `holder`, `role` (standby,
        leader or stopped), since when it leads, how often it tried, and each task's interval,
        runs, failures and last run (start, duration in seconds, result, error) while this
        process led."""
        return {
            "holder": self.holder,
            "role": self.role,
            "leaderSince": self.leader_since.isoformat() if self.leader_since else None,
            "terms": self.terms,
            "standbyIntervalS": self.standby_s,
            "tickS": self.tick_s,
            "tasks": [self.records[t.name].as_json(t) for t in self.tasks],
        }


def holder_of(application_name: str) -> str | None:
    """The holder named in a lock connection's application_name, or None for another
    connection."""
    if application_name.startswith(APPLICATION_NAME_PREFIX):
        return application_name[len(APPLICATION_NAME_PREFIX) :]
    return None
