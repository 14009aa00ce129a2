"""The worker: claim ready steps, run their tools, keep their leases alive, record results.

One asyncio loop over a `workers.backend.Backend` (Postgres, or the API's agent protocol):

- claim loop: claims as many steps as it has free slots (``--concurrency``); a database
  backend wakes it on ``LISTEN pgdag_ready`` and it polls every `poll_interval_s` as a
  safety net (a NOTIFY sent while the listener was reconnecting is lost, so polling is never
  optional); an agent backend long-polls the API instead;
- heartbeat loop: every `Backend.heartbeat_interval_s`, extends the leases of its attempts
  (by fencing token) and refreshes its workers row; an attempt whose lease is gone is
  cancelled, since its result would be refused anyway;
- the backend's own loops (`Backend.background`): listener and maintenance service for the
  database, the idempotency log's re-sender for agents.

SIGTERM/SIGINT: stop claiming, let in-flight attempts finish for `shutdown_grace_s`, then
cancel the rest and release their leases so another worker takes them at once.
The worker contains no SQL and no HTTP: every operation is a `Backend` method.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import random
import signal
import socket
import time
from dataclasses import dataclass, field
from typing import Any

from pydantic import ValidationError

from engine import jsonb, logs, metrics, tracing
from engine.config import Settings
from engine.errors import (
    LeaseLost,
    OutputRefused,
    PgdagError,
    StepsRefused,
    ToolError,
    UnknownTool,
    UnstorableJson,
)
from engine.tools import ToolContext, get_tool, registered_tools
from engine.transitions import ClaimedStep, output_json
from workers.backend import Backend

logger = logging.getLogger(__name__)

MAX_CLAIM = 100  # steps claimed per statement at most
CRASH_POINTS = ("before_tool", "during_tool", "after_tool")
REGISTER_RETRY_MAX_S = 5.0  # longest pause between two tries to register at start


@dataclass(frozen=True)
class CrashPlan:
    """Test-only fault injection (``--random-failures P``): each attempt SIGKILLs this
    process with probability `probability`, at a point drawn from `CRASH_POINTS`: before the
    tool runs, while it runs, or after it returned but before the result is recorded.
    `seed` makes the draws reproducible."""

    probability: float
    seed: int | None = None


def _crash(point: str, step: ClaimedStep) -> None:
    logger.warning(
        "crash injected %s of run %s step %s attempt %d: SIGKILL self",
        point,
        step.run_id,
        step.name,
        step.attempt,
    )
    logging.shutdown()
    os.kill(os.getpid(), signal.SIGKILL)


@dataclass
class _Attempt:
    step: ClaimedStep
    task: asyncio.Task[None] | None = None
    lease_lost: bool = False
    claimed_at: float = field(default_factory=time.monotonic)  # for its duration metric
    # What it came to (`engine.tracing.OUTCOMES`; None while running) and why, if it failed.
    outcome: str | None = None
    error: str | None = None
    span: tracing.SpanHandle = tracing.NO_SPAN  # the attempt's own once it starts


class _LogKeys:
    """An attempt's log keys, built only when a line is logged (`engine.logs.bind_attempt`).
    It holds the step, not the `_Attempt`: the task's context keeps it, and an `_Attempt`
    there would make a reference cycle (attempt -> task -> context -> attempt) that only
    the cyclic collector could free, thousands of them per second."""

    __slots__ = ("step", "worker_id")

    def __init__(self, step: ClaimedStep, worker_id: str) -> None:
        self.step = step
        self.worker_id = worker_id

    def log_context(self) -> dict[str, Any]:
        """``run_id``, ``step``, ``attempt``, ``worker``, ``lease_token``."""
        step = self.step
        return {
            "run_id": step.run_id,
            "step": step.name,
            "attempt": step.attempt,
            "worker": self.worker_id,
            "lease_token": step.lease_token,
        }


class SuccessBatcher:
    """Group commit for successes: attempts hand their result to `record` and wait; one
    task writes everything handed over meanwhile in one `Backend.complete_many` (one
    `complete_steps` statement, or one agent report; up to `max_batch`), then the next
    batch, with no timer. At low load a batch is one step
    and costs what a lone write costs; under load, batches grow while the previous write is
    in flight, so the run's counter row and the commit are paid once per batch, not per step.

    The price is a window between a tool returning and its result being durable: at most
    one write in flight plus the write itself (milliseconds). A worker killed inside it
    loses those results, and the steps run again after their lease expires (at-least-once).
    That is why ``"idempotent": false`` steps never come here: `Worker` records them at once,
    on their own.
    """

    def __init__(self, backend: Backend, *, max_batch: int = 500) -> None:
        self.backend = backend
        self.max_batch = max_batch
        self.batches = 0
        self._pending: list[tuple[ClaimedStep, str, asyncio.Future[PgdagError | None]]] = []
        self._wake = asyncio.Event()

    async def record(self, step: ClaimedStep, output_json_text: str) -> None:
        """Queue `step`'s success and wait until it is committed. Raises `LeaseLost` when
        the token was no longer current, `OutputRefused` when Postgres refused this output
        (the attempt was failed, not retryably; its batch-mates are recorded one by one), or
        the database error that ended the write."""
        future: asyncio.Future[PgdagError | None] = asyncio.get_running_loop().create_future()
        self._pending.append((step, output_json_text, future))
        self._wake.set()
        refused = await future
        if refused is not None:
            raise refused

    async def run(self) -> None:
        """The writer loop; runs until cancelled."""
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._pending:
                batch = self._pending[: self.max_batch]
                del self._pending[: self.max_batch]
                await self._write(batch)

    async def _write(
        self, batch: list[tuple[ClaimedStep, str, asyncio.Future[PgdagError | None]]]
    ) -> None:
        self.batches += 1
        try:
            outcome = await self.backend.complete_many([(step, text) for step, text, _ in batch])
        except Exception as exc:  # every waiter learns the write failed
            for _, _, future in batch:
                if not future.done():
                    future.set_exception(exc)
            return
        for step, _, future in batch:
            if not future.done():  # the attempt may have been cancelled meanwhile
                future.set_result(outcome.get(step.id))


@dataclass
class WorkerStats:
    """Counters a worker keeps about itself (logged at shutdown)."""

    claimed: int = 0
    succeeded: int = 0
    failed: int = 0
    leases_lost: int = 0
    released: int = 0
    started_at: float = field(default_factory=time.monotonic)


def default_worker_id() -> str:
    """``<hostname>-<pid>``: unique per live process on a host."""
    return f"{socket.gethostname()}-{os.getpid()}"


class Worker:
    """A worker process's engine: `run()` until `stop()` (or SIGTERM) and shutdown.

    `backend` does every operation (`workers.database.DatabaseBackend` or
    `workers.agent.AgentBackend`) and names the worker (`backend.worker_id`); `settings`
    gives the poll interval, the shutdown grace, the output cap and the map width;
    `concurrency` is the number of attempts run at once (raises `ValueError` below 1).
    """

    def __init__(
        self,
        backend: Backend,
        settings: Settings,
        *,
        concurrency: int = 4,
        crash_plan: CrashPlan | None = None,
    ) -> None:
        if concurrency < 1:
            raise ValueError(f"concurrency must be >= 1, got {concurrency}")
        self.backend = backend
        self.settings = settings
        self.worker_id = backend.worker_id
        self.concurrency = concurrency
        self.stats = WorkerStats()
        self._attempts: dict[int, _Attempt] = {}
        self._wake = asyncio.Event()
        self._stopping = asyncio.Event()
        self._crash_plan = crash_plan
        self._crash_rng = random.Random(crash_plan.seed if crash_plan else None)
        self._successes = SuccessBatcher(backend)
        # Whether attempts get spans: decided once, here (a tracer provider is set up before,
        # by opentelemetry-instrument or a PGDAG_TOOLS module, as the tools are loaded), since
        # asking opentelemetry reads os.environ each time (2 us an attempt).
        self._recording = tracing.recording()
        self._counts_attempts = backend.counts_attempts  # read once: the hot path asks often
        # The tools this process loaded: registered with the worker's row and passed to
        # every claim, so that it is never handed a step it cannot run.
        self.tools = tuple(sorted(registered_tools()))
        # Claim when at least this many slots are free (or nothing is in flight): one claim
        # statement per batch of finished steps instead of one per step under load.
        self._claim_min = max(1, min(concurrency // 4, 50))

    # --- lifecycle ----------------------------------------------------------------------

    def stop(self) -> None:
        """Ask the worker to shut down gracefully (what SIGTERM does)."""
        if not self._stopping.is_set():
            logger.info("worker %s stopping: no new claims", self.worker_id)
        self._stopping.set()
        self._wake.set()

    def install_signal_handlers(self) -> None:
        """SIGTERM and SIGINT call `stop()`."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stop)

    async def run(self) -> None:
        """Register, run the loops until `stop()`, then shut down gracefully."""
        await self._register()
        logger.info(
            "worker %s started: concurrency %d, heartbeat every %.1fs, tools %s",
            self.worker_id,
            self.concurrency,
            self.backend.heartbeat_interval_s,
            ", ".join(self.tools),
        )
        background = [
            asyncio.create_task(self._heartbeat_loop(), name="heartbeat"),
            asyncio.create_task(self._successes.run(), name="successes"),
            *(asyncio.create_task(c) for c in self.backend.background(self._wake.set)),
        ]
        try:
            await self._claim_loop()
            await self._drain()
        finally:
            for task in background:
                task.cancel()
            await asyncio.gather(*background, return_exceptions=True)
            with contextlib.suppress(Exception):
                await self.backend.stopped()
            s = self.stats
            logger.info(
                "worker %s stopped: claimed %d, succeeded %d, failed %d, leases lost %d, "
                "released %d",
                self.worker_id,
                s.claimed,
                s.succeeded,
                s.failed,
                s.leases_lost,
                s.released,
            )

    async def _register(self) -> None:
        """Register until it works, with capped exponential backoff (a log line per try);
        errors that are not `Backend.transient` propagate (a refused token, say)."""
        delay = 0.1
        while True:
            try:
                await self.backend.register(concurrency=self.concurrency, tools=self.tools)
                return
            except self.backend.transient as exc:
                logger.warning(
                    "worker %s cannot register yet (%s); retrying in %.1fs",
                    self.worker_id,
                    str(exc).strip() or type(exc).__name__,
                    delay,
                )
                await asyncio.sleep(delay)
                delay = min(REGISTER_RETRY_MAX_S, delay * 2)

    # --- claiming -----------------------------------------------------------------------

    async def _claim_loop(self) -> None:
        error_delay = 0.1
        while not self._stopping.is_set():
            free = self.concurrency - len(self._attempts)
            got = 0
            polled = False  # a claim that waited for work (long poll) was answered
            if free >= self._claim_min or (free > 0 and not self._attempts):
                try:
                    steps = await self._claim(min(free, MAX_CLAIM))
                except self.backend.transient as exc:
                    logger.warning("claim failed (%s); retrying in %.1fs", exc, error_delay)
                    await self._sleep_or_wake(error_delay)
                    error_delay = min(2.0, error_delay * 2)
                    continue
                error_delay = 0.1
                polled = self.backend.long_polls and self.backend.max_wait_s > 0
                got = len(steps)
                if self._counts_attempts:
                    metrics.count_claims(steps)
                for step in steps:
                    self._start_attempt(step)
            if got:
                continue  # there may be more ready work: ask again (or wait for free slots)
            if polled:
                continue  # the claim waited for work already
            await self._sleep_or_wake(self.settings.poll_interval_s * (0.8 + random.random() * 0.4))

    async def _claim(self, limit: int) -> list[ClaimedStep]:
        """One claim; a long poll is abandoned when `stop()` is called (steps the backend
        was handing over meanwhile go back when their lease expires)."""
        if not self.backend.long_polls:
            return await self.backend.claim(limit, self.tools, wait_s=0)
        claim = asyncio.ensure_future(
            self.backend.claim(limit, self.tools, wait_s=self.backend.max_wait_s)
        )
        stopping = asyncio.ensure_future(self._stopping.wait())
        try:
            await asyncio.wait({claim, stopping}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopping.cancel()
            if not claim.done():
                claim.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            return await claim
        return []

    async def _sleep_or_wake(self, timeout_s: float) -> None:
        self._wake.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wake.wait(), timeout_s)

    def _start_attempt(self, step: ClaimedStep) -> None:
        self.stats.claimed += 1
        previous = self._attempts.get(step.id)
        if previous is not None and previous.task is not None and not previous.task.done():
            # We re-claimed a step whose earlier attempt here lost its lease (it expired while
            # heartbeats failed) but is still running: that attempt is dead, stop it.
            previous.lease_lost = True
            self.stats.leases_lost += 1
            self._count(previous, "lease_lost")
            previous.task.cancel()
        attempt = _Attempt(step=step)
        self._attempts[step.id] = attempt
        run = self._traced_attempt if self._recording else self._attempt
        attempt.task = asyncio.create_task(run(attempt), name=f"step-{step.id}")

    def _attempt_done(self, attempt: _Attempt) -> None:
        if self._attempts.get(attempt.step.id) is attempt:  # not a newer attempt of the step
            del self._attempts[attempt.step.id]
        self._wake.set()  # a slot is free

    # --- running one attempt ------------------------------------------------------------

    async def _traced_attempt(self, attempt: _Attempt) -> None:
        """The attempt's task when attempts get spans (`engine.tracing`): `_attempt` inside
        the attempt's span, a child of the run's, which ends with its outcome. (With tracing
        off the task is `_attempt` itself: no span context manager, no second coroutine to
        resume at every await, 3.5 + 2 us an attempt.)"""
        step = attempt.step
        with tracing.attempt_span(
            step.trace_context,
            run_id=step.run_id,
            step=step.name,
            tool=step.tool,
            attempt=step.attempt,
            worker=self.worker_id,
            lease_token=step.lease_token,
        ) as span:
            attempt.span = span
            try:
                await self._attempt(attempt)
            finally:
                span.set(outcome=attempt.outcome or "cancelled")
                if attempt.outcome not in (None, "succeeded"):
                    span.fail(attempt.error or attempt.outcome or "")

    async def _attempt(self, attempt: _Attempt) -> None:
        """One attempt, from its claim to its recorded outcome: every line it logs carries
        run_id, step, attempt, worker and lease_token (`engine.logs`); its tool's context
        carries the run's trace context on (`_traced_attempt` gives it a span of its own)."""
        step = attempt.step
        logs.bind_attempt(_LogKeys(step, self.worker_id))
        if attempt.span is tracing.NO_SPAN and step.trace_context:
            attempt.span = tracing.SpanHandle(passed_on=step.trace_context)
        crash_at = self._draw_crash_point()
        try:
            logger.debug("attempt started: %s", step.tool)
            if crash_at == "before_tool":
                _crash(crash_at, step)
            if crash_at == "during_tool":
                asyncio.get_running_loop().call_later(
                    self._crash_rng.random() * 0.05, _crash, crash_at, step
                )
            if step.input_error is not None:  # a reference that did not resolve
                await self._fail(attempt, step.input_error, retryable=False)
                return
            if step.map_expand:
                await self._expand_map(attempt)
                return
            added: list[dict[str, Any]] = []  # what the tool passed to ctx.add_steps
            try:
                # A map step's join has no tool to run: complete_steps builds its output.
                output = None if step.map_join else await self._execute(step, attempt.span, added)
            except ToolError as exc:
                await self._fail(attempt, str(exc), retryable=exc.retryable)
                return
            if crash_at in ("during_tool", "after_tool"):
                _crash("after_tool", step)
            try:
                text = output_json(output, max_bytes=self.settings.max_output_bytes)
                if added:  # as POST /runs would take them (its body cap): plain JSON only
                    added = json.loads(
                        jsonb.dumps(added, path="addSteps", max_bytes=self.settings.max_body_bytes)
                    )
            except UnstorableJson as exc:  # jsonb would refuse it: this attempt fails for good
                await self._fail(attempt, str(exc), retryable=False)
                return
            try:
                if added:  # its own transaction with the new steps: see complete_adding_steps
                    await self.backend.complete_adding_steps(step, text, added)
                elif step.idempotent:
                    await self._successes.record(step, text)
                else:  # at once and alone: see SuccessBatcher
                    await self.backend.complete(step, text)
                self.stats.succeeded += 1
                if self._counts_attempts:
                    metrics.count_success(step.tool, time.monotonic() - attempt.claimed_at)
                attempt.outcome = "succeeded"
                logger.debug("attempt succeeded")
            except LeaseLost as exc:
                self.stats.leases_lost += 1
                self._count(attempt, "lease_lost")
                attempt.outcome, attempt.error = "lease_lost", str(exc)
                logger.warning("result of run %s step %s refused: %s", step.run_id, step.name, exc)
            except OutputRefused as exc:  # already recorded as a failed attempt
                self.stats.failed += 1
                self._count(attempt, "refused", dead_letter=True)
                attempt.outcome, attempt.error = "refused", str(exc)
                what = "added steps" if isinstance(exc, StepsRefused) else "output"
                logger.warning("attempt %s refused, dead letter: %s", what, exc)
        except asyncio.CancelledError:
            if not attempt.lease_lost:
                attempt.outcome = "cancelled"
                raise  # shutdown: the lease is released by _drain
            attempt.outcome = "lease_lost"
        except Exception as exc:
            attempt.outcome, attempt.error = "error", f"{type(exc).__name__}: {exc}"
            logger.exception("attempt cannot record its outcome")
        finally:
            self._attempt_done(attempt)

    async def _expand_map(self, attempt: _Attempt) -> None:
        """A map step's first claim: one child per element of its source; the step then
        waits for them. A source that is not an array, or too wide, fails the step for good."""
        step = attempt.step
        try:
            expansion = await self.backend.expand_map(step, max_width=self.settings.max_map_width)
        except LeaseLost as exc:
            self.stats.leases_lost += 1
            self._count(attempt, "lease_lost")
            attempt.outcome, attempt.error = "lease_lost", str(exc)
            logger.warning("map step %s of run %s not expanded: %s", step.name, step.run_id, exc)
            return
        if expansion.problem is not None:
            await self._fail(attempt, expansion.problem, retryable=False)
            return
        attempt.outcome = "succeeded"
        logger.info(
            "run %s map step %s expanded into %d children",
            step.run_id,
            step.name,
            expansion.width,
        )

    def _draw_crash_point(self) -> str | None:
        plan = self._crash_plan
        if plan is None or self._crash_rng.random() >= plan.probability:
            return None
        return self._crash_rng.choice(CRASH_POINTS)

    async def _execute(
        self, step: ClaimedStep, span: tracing.SpanHandle, added: list[dict[str, Any]]
    ) -> object:
        """Run the step's tool (its context carries `span`'s trace context); every failure
        becomes a `ToolError`. The steps the tool adds (`ToolContext.add_steps`) go to `added`
        (its context's `added_steps` is that list); the caller uses them only if it
        returns."""
        try:
            tool = get_tool(step.tool)
        except UnknownTool as exc:
            raise ToolError(
                f"worker {self.worker_id} cannot run it: {exc} (load it with PGDAG_TOOLS)",
                retryable=True,
            ) from None
        try:
            inp = tool.parse_input(step.input)
        except ValidationError as exc:
            raise ToolError(f"input refused by {step.tool}: {exc}", retryable=False) from None
        ctx = ToolContext(
            run_id=step.run_id,
            step_name=step.name,
            attempt=step.attempt,
            idempotency_key=step.idempotency_key,
            timeout_ms=step.timeout_ms,
            http_allow_private=self.settings.http_allow_private,
            trace_context=span.carrier(),
            added_steps=added,  # what the tool adds goes straight to the caller's list
        )
        try:
            if step.timeout_ms is None:
                output = await tool.fn(inp, ctx)
            else:
                async with asyncio.timeout(step.timeout_ms / 1000):
                    output = await tool.fn(inp, ctx)
        except TimeoutError:
            raise ToolError(f"timed out after {step.timeout_ms} ms (timeoutMs)") from None
        except (ToolError, asyncio.CancelledError):
            raise
        except Exception as exc:
            raise ToolError(f"{type(exc).__name__}: {exc}") from exc
        return output

    def _count(
        self, attempt: _Attempt, outcome: str, *, retried: bool = False, dead_letter: bool = False
    ) -> None:
        """Count `attempt`'s `outcome` in `engine.metrics` (when this backend's attempts are
        counted here: `Backend.counts_attempts`); the duration (seconds since its claim, on
        this process's clock) of an attempt whose result was recorded."""
        if not self._counts_attempts:
            return
        recorded = outcome in ("succeeded", "failed")
        metrics.count_result(
            attempt.step.tool,
            outcome,
            duration_s=time.monotonic() - attempt.claimed_at if recorded else None,
            retried=retried,
            dead_letter=dead_letter,
        )

    async def _fail(self, attempt: _Attempt, error: str, *, retryable: bool) -> None:
        step = attempt.step
        self.stats.failed += 1
        attempt.error = error
        try:
            outcome = await self.backend.fail(step, error=error, retryable=retryable)
        except LeaseLost as exc:
            self.stats.leases_lost += 1
            self._count(attempt, "lease_lost")
            attempt.outcome = "lease_lost"
            logger.warning(
                "failure of run %s step %s not recorded: %s", step.run_id, step.name, exc
            )
            return
        self._count(
            attempt,
            "failed",
            retried=outcome.status == "ready",
            dead_letter=outcome.status == "dead_letter",
        )
        attempt.outcome = "failed"
        attempt.span.set(dead_letter=outcome.status != "ready")
        if outcome.status == "ready":
            logger.info("attempt failed (%s); retry in %.0f ms", error, outcome.backoff_ms)
        else:
            logger.warning("attempt failed (%s); dead letter", error)

    # --- leases -------------------------------------------------------------------------

    async def _heartbeat_loop(self) -> None:
        while True:
            await asyncio.sleep(self.backend.heartbeat_interval_s)
            try:
                await self._heartbeat_once()
            except Exception:  # the loop must outlive any one failure, or leases lapse
                logger.exception("heartbeat pass failed")

    async def _heartbeat_once(self) -> None:
        attempts = list(self._attempts.values())
        leases = [(a.step.id, a.step.lease_token) for a in attempts]
        try:
            held = await self.backend.heartbeat(leases)
        except self.backend.transient as exc:
            logger.warning("lease heartbeat failed: %s", exc)
            return
        try:
            await self.backend.worker_heartbeat(
                status="stopping" if self._stopping.is_set() else "running"
            )
        except self.backend.transient as exc:
            logger.warning("worker heartbeat failed: %s", exc)
        for a in attempts:
            if a.step.id not in held and a.task is not None and not a.task.done():
                a.lease_lost = True
                self.stats.leases_lost += 1
                self._count(a, "lease_lost")
                with logs.bound(
                    run_id=a.step.run_id,
                    step=a.step.name,
                    attempt=a.step.attempt,
                    worker=self.worker_id,
                    lease_token=a.step.lease_token,
                ):
                    logger.warning(
                        "run %s step %s attempt %d: lease lost; abandoning the attempt",
                        a.step.run_id,
                        a.step.name,
                        a.step.attempt,
                    )
                a.task.cancel()

    # --- shutdown -----------------------------------------------------------------------

    async def _drain(self) -> None:
        """Let in-flight attempts finish within the grace period, then release the rest."""
        tasks = [a.task for a in self._attempts.values() if a.task is not None]
        if tasks:
            logger.info(
                "worker %s: waiting up to %.1fs for %d in-flight step(s)",
                self.worker_id,
                self.settings.shutdown_grace_s,
                len(tasks),
            )
            await asyncio.wait(tasks, timeout=self.settings.shutdown_grace_s)
        leftover = [a for a in self._attempts.values() if a.task is not None and not a.task.done()]
        if not leftover:
            return
        for a in leftover:
            assert a.task is not None
            a.task.cancel()
        await asyncio.gather(*(a.task for a in leftover if a.task), return_exceptions=True)
        try:
            released = await self.backend.release(
                [(a.step.id, a.step.lease_token) for a in leftover]
            )
        except self.backend.transient as exc:
            logger.warning("could not release %d step(s) (%s); the reaper will", len(leftover), exc)
            return
        self.stats.released += released
        logger.info("worker %s released %d unfinished step(s)", self.worker_id, released)
