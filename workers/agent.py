"""`AgentBackend`: a worker that reaches only the API (``python -m workers --server URL``).

It speaks the agent protocol (``POST /agent/*``, docs/agents.md) over one
`httpx.AsyncClient`, and holds no ``DATABASE_URL``: the API does every write through the
same fenced transitions as database workers.

- claim: long-polls ``/agent/claim`` up to the server's ``maxWaitMs`` (the HTTP timeout
  is above it); a step whose outcome the log already holds is never run again;
- heartbeat: ``/agent/heartbeat``; the answer's ``lost`` leases stop their attempts;
- report: each outcome is first written to the idempotency log (`workers.agent_log`,
  fsync'd), then reported. The Worker's group commit hands over batches of successes: one
  report each. A report the API did not answer (down, network cut, 5xx) is re-sent with
  capped exponential backoff while the attempt's lease lasts (`lease_ttl_s` after the last
  claim or heartbeat that extended it, on this machine's monotonic clock: no clock skew);
  after that it stays pending in the log and a background loop re-sends it until the API
  answers, which is then ``refused`` (``lease_lost``) unless nobody took the step
  meanwhile. At start, before any claim, every pending outcome is re-reported;
- release on SIGTERM (``/agent/release``), then ``/agent/stopped``.

Errors: `ApiUnavailable` (transient: the Worker retries), `AgentRefused` (401/403: the
token is missing, unknown or of the wrong scope; the process exits 2 with the message),
`ProtocolError` (the API refused a request as malformed: a bug, logged).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
import time
from collections.abc import Callable, Coroutine, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx

from engine.errors import ConfigError, LeaseLost, OutputRefused, PgdagError, StepsRefused
from engine.jsonb import storable_text
from engine.supervisor import SUPERVISOR_ENV
from engine.transitions import ClaimedStep, FailOutcome, MapExpansion
from workers.agent_log import AgentLog, LoggedOutcome, failure_body, success_body

logger = logging.getLogger(__name__)

CONNECT_TIMEOUT_S = 5.0  # to open a connection to the API
REQUEST_TIMEOUT_S = 15.0  # for an answer, beyond a claim's waitMs
REPORT_RETRY_FIRST_S = 0.2  # first pause before re-sending an unanswered report; doubles
REPORT_RETRY_MAX_S = 5.0  # up to this, while the lease lasts
FLUSH_RETRY_MAX_S = 30.0  # the background re-sender's longest pause
FLUSH_IDLE_S = 5.0  # how often the re-sender looks at the log when nothing woke it
MAX_OUTCOMES = 500  # outcomes per report (the protocol's cap)
MAX_ERROR_CHARS = 65_536  # the longest error text a report may carry
REPORT_BYTES_MARGIN = 4096  # kept free under the API's body cap for the envelope


class ApiUnavailable(PgdagError):
    """The API did not answer (connection refused or cut, timeout, 5xx); try again later."""


class AgentRefused(ConfigError):
    """The API refused this agent's token: set ``--token`` or ``PGDAG_AGENT_TOKEN`` to a
    token of scope ``agent`` (``python -m engine token create NAME --scope agent``)."""


class ProtocolError(PgdagError):
    """The API refused a request of this agent as malformed (422) or answered something
    this agent does not understand."""


@dataclass(frozen=True)
class AgentSettings:
    """Where the API is and how to prove who we are: ``--server`` / ``PGDAG_SERVER``,
    ``--token`` / ``PGDAG_AGENT_TOKEN``, ``--agent-log`` (default
    ``~/.pgdag/agent-<agentId>.sqlite3``)."""

    server: str | None = None
    token: str | None = None
    agent_log: str | None = None
    # Under ``--processes N`` (PGDAG_SUPERVISOR_PID set) the children share the flags: each
    # must still have a log of its own.
    supervised: bool = False

    @classmethod
    def from_env(
        cls, env: Mapping[str, str] | None = None, **overrides: str | None
    ) -> AgentSettings:
        """Read ``PGDAG_SERVER`` and ``PGDAG_AGENT_TOKEN``; `overrides` (flags) win when not
        None. Raises `ConfigError` for a server URL that is not http(s)."""
        env = os.environ if env is None else env
        server = overrides.get("server") or env.get("PGDAG_SERVER") or None
        token = overrides.get("token") or env.get("PGDAG_AGENT_TOKEN") or None
        if server is not None and not server.startswith(("http://", "https://")):
            raise ConfigError(f"--server / PGDAG_SERVER must be an http(s) URL, got {server!r}")
        return cls(
            server=server,
            token=token,
            agent_log=overrides.get("agent_log"),
            supervised=bool(env.get(SUPERVISOR_ENV)),
        )

    def log_path(self, agent_id: str) -> Path:
        """The idempotency log's file for `agent_id`: ``--agent-log`` with ``{agentId}``
        replaced (a supervised child's path without it gets ``-<agentId>`` before its
        suffix), else ``~/.pgdag/agent-<agentId>.sqlite3``."""
        if not self.agent_log:
            return Path("~/.pgdag").expanduser() / f"agent-{agent_id}.sqlite3"
        if "{agentId}" in self.agent_log:
            return Path(self.agent_log.replace("{agentId}", agent_id)).expanduser()
        path = Path(self.agent_log).expanduser()
        if self.supervised:
            return path.with_name(f"{path.stem}-{agent_id}{path.suffix}")
        return path


def _parse_time(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


def _step(data: dict[str, Any]) -> ClaimedStep:
    return ClaimedStep(
        id=int(data["stepId"]),
        run_id=str(data["runId"]),
        name=str(data["name"]),
        tool=str(data["tool"]),
        input=data["input"],
        attempt=int(data["attempt"]),
        max_attempts=int(data["maxAttempts"]),
        timeout_ms=data.get("timeoutMs"),
        idempotent=bool(data["idempotent"]),
        lease_token=int(data["leaseToken"]),
        lease_expires_at=_parse_time(data["leaseExpiresAt"]),
        trace_context=data.get("traceContext") or None,
    )


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


class AgentBackend:
    """The `workers.backend.Backend` of an agent: the API at `server` (a base URL),
    `token` as ``Authorization: Bearer`` (None: none sent), `log` the idempotency log.
    `restarts` and `last_exit_code` are what the supervisor told this process.
    `max_body_bytes` caps one report's body (the API's ``PGDAG_MAX_BODY_BYTES``)."""

    transient: tuple[type[BaseException], ...] = (ApiUnavailable,)
    long_polls = True
    counts_attempts = False  # the API counts the reports (engine.agents._count_report)

    def __init__(
        self,
        server: str,
        *,
        worker_id: str,
        log: AgentLog,
        token: str | None = None,
        restarts: int = 0,
        last_exit_code: int | None = None,
        max_body_bytes: int = 10 * 1024 * 1024,
    ) -> None:
        self.server = server.rstrip("/")
        self.worker_id = worker_id
        self.log = log
        self.restarts = restarts
        self.last_exit_code = last_exit_code
        self.max_body_bytes = max_body_bytes
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._client = httpx.AsyncClient(
            base_url=self.server,
            headers=headers,
            timeout=httpx.Timeout(REQUEST_TIMEOUT_S, connect=CONNECT_TIMEOUT_S),
        )
        # Learnt at registration (the server's settings).
        self.lease_ttl_s = 30.0
        self._heartbeat_interval_s = 10.0
        self._max_wait_s = 0.0
        self._registration: dict[str, Any] | None = None
        # (step_id, token) -> monotonic time its lease ends, as far as this agent knows.
        self._lease_ends: dict[tuple[int, int], float] = {}
        # Outcomes a running attempt is reporting itself (the re-sender leaves them alone).
        self._reporting: set[tuple[int, int]] = set()
        self._flush_wake = asyncio.Event()

    # --- the protocol -------------------------------------------------------------------

    async def _post(
        self, path: str, body: dict[str, Any] | bytes, *, timeout_s: float | None = None
    ) -> dict[str, Any]:
        """POST `body` (a dict, or JSON bytes) to `path`; the decoded answer. Raises
        `ApiUnavailable`, `AgentRefused`, `ProtocolError`."""
        try:
            if isinstance(body, bytes):
                response = await self._client.post(
                    path,
                    content=body,
                    headers={"Content-Type": "application/json"},
                    timeout=timeout_s or httpx.USE_CLIENT_DEFAULT,
                )
            else:
                response = await self._client.post(
                    path, json=body, timeout=timeout_s or httpx.USE_CLIENT_DEFAULT
                )
        except httpx.TransportError as exc:
            raise ApiUnavailable(f"{self.server}{path}: {_first_line(exc)}") from None
        if response.status_code == 200:
            try:
                answer: dict[str, Any] = response.json()
            except ValueError:
                raise ProtocolError(f"{path}: the answer is not JSON") from None
            return answer
        try:
            error = response.json()
            message = str(error.get("message") or error.get("error") or response.text)
        except (ValueError, AttributeError):
            error, message = {}, response.text.strip()[:300]
        if response.status_code in (401, 403):
            raise AgentRefused(
                f"the API at {self.server} refused agent {self.worker_id} "
                f"({response.status_code}): {message}"
            )
        if response.status_code >= 500 or response.status_code == 429:
            raise ApiUnavailable(f"{self.server}{path}: {response.status_code} {message}")
        if response.status_code == 409 and error.get("error") == "agent_not_registered":
            # The row was marked stopped or lost (a restored database): register again.
            await self._register_again()
            raise ApiUnavailable(f"{path}: agent was not registered; registered again")
        problems = error.get("problems") if isinstance(error, dict) else None
        raise ProtocolError(
            f"{path} refused ({response.status_code}): {message}"
            + (f" {json.dumps(problems)}" if problems else "")
        )

    @property
    def heartbeat_interval_s(self) -> float:
        """The server's ``heartbeatIntervalMs``, in seconds."""
        return self._heartbeat_interval_s

    @property
    def max_wait_s(self) -> float:
        """The server's ``maxWaitMs``, in seconds."""
        return self._max_wait_s

    async def register(self, *, concurrency: int, tools: Sequence[str]) -> None:
        """``/agent/register``, then re-report every pending outcome of the log (before
        any claim: what this agent finished before a restart is told first). Raises
        `ApiUnavailable` (retried by the Worker) and `AgentRefused`."""
        self._registration = {
            "agentId": self.worker_id,
            "tools": list(tools),
            "concurrency": concurrency,
            "hostname": socket.gethostname(),
            "pid": os.getpid(),
            "restarts": self.restarts,
            "lastExitCode": self.last_exit_code,
        }
        await self._register_again()
        pending = await asyncio.to_thread(self.log.pending, limit=1_000_000)
        if pending:
            logger.info(
                "agent %s: re-reporting %d outcome(s) left in %s before claiming",
                self.worker_id,
                len(pending),
                self.log.path,
            )
            await self._send(pending)

    async def _register_again(self) -> None:
        if self._registration is None:
            raise ProtocolError("the agent must register first")
        answer = await self._post("/agent/register", self._registration)
        self.lease_ttl_s = float(answer["leaseTtlMs"]) / 1000
        self._heartbeat_interval_s = float(answer["heartbeatIntervalMs"]) / 1000
        self._max_wait_s = float(answer["maxWaitMs"]) / 1000

    async def claim(self, limit: int, tools: Sequence[str], *, wait_s: float) -> list[ClaimedStep]:
        """``/agent/claim``, waiting up to `wait_s` (capped at the server's maximum)."""
        wait_ms = max(0, min(round(wait_s * 1000), round(self._max_wait_s * 1000)))
        asked_at = time.monotonic()
        answer = await self._post(
            "/agent/claim",
            {"agentId": self.worker_id, "tools": list(tools), "max": limit, "waitMs": wait_ms},
            timeout_s=wait_ms / 1000 + REQUEST_TIMEOUT_S,
        )
        steps = [_step(s) for s in answer.get("steps", [])]
        if not steps:
            return []
        # One trip to the log's thread for the whole claim (one per step cost more CPU than
        # the rest of the claim: docs/benchmarks.md, W9).
        held = await asyncio.to_thread(self.log.held, [(s.id, s.lease_token) for s in steps])
        fresh: list[ClaimedStep] = []
        for step in steps:
            self._lease_ends[(step.id, step.lease_token)] = asked_at + self.lease_ttl_s
            if (step.id, step.lease_token) in held:
                # Never run twice an attempt whose outcome we hold: report it instead.
                logger.warning(
                    "run %s step %s attempt %d (token %d): outcome already in the log; "
                    "reporting it, not running it again",
                    step.run_id,
                    step.name,
                    step.attempt,
                    step.lease_token,
                )
                self._flush_wake.set()
                continue
            fresh.append(step)
        return fresh

    async def heartbeat(self, leases: list[tuple[int, int]]) -> set[int]:
        """``/agent/heartbeat``; the step ids still held (their lease ends pushed back)."""
        sent_at = time.monotonic()
        answer = await self._post(
            "/agent/heartbeat",
            {
                "agentId": self.worker_id,
                "leases": [{"stepId": s, "leaseToken": t} for s, t in leases],
            },
        )
        held: set[int] = set()
        extended: list[tuple[int, int, str]] = []
        for lease in answer.get("held", []):
            key = (int(lease["stepId"]), int(lease["leaseToken"]))
            held.add(key[0])
            self._lease_ends[key] = sent_at + self.lease_ttl_s
            if key in self._reporting:
                extended.append((*key, str(lease["leaseExpiresAt"])))
        for lease in answer.get("lost", []):
            self._lease_ends.pop((int(lease["stepId"]), int(lease["leaseToken"])), None)
        if extended:
            await asyncio.to_thread(self.log.extend, extended)
        return held

    async def complete(self, step: ClaimedStep, output_json: str) -> None:
        """Log, then report one success; raises `LeaseLost` or `OutputRefused`."""
        problem = (await self.complete_many([(step, output_json)])).get(step.id)
        if problem is not None:
            raise problem

    async def complete_many(
        self, results: list[tuple[ClaimedStep, str]]
    ) -> dict[int, PgdagError | None]:
        """Log, then report a batch of successes in one report (or a few, under the API's
        body cap); per step id None, `LeaseLost` or `OutputRefused`."""
        rows = [
            self._row(step, "succeeded", success_body(step.id, step.lease_token, text))
            for step, text in results
        ]
        answers = await self._log_and_report(rows)
        problems: dict[int, PgdagError | None] = {}
        for step, _ in results:
            answer = answers[(step.id, step.lease_token)]
            problems[step.id] = _problem(answer)
        return problems

    async def complete_adding_steps(
        self, step: ClaimedStep, output_json: str, steps: list[dict[str, Any]]
    ) -> None:
        """Log, then report one success with ``addSteps``; raises `LeaseLost` or
        `StepsRefused` (the API failed the attempt for good)."""
        body = success_body(step.id, step.lease_token, output_json, add_steps=steps)
        answers = await self._log_and_report([self._row(step, "succeeded", body)])
        problem = _problem(answers[(step.id, step.lease_token)])
        if problem is not None:
            raise problem

    async def fail(self, step: ClaimedStep, *, error: str, retryable: bool) -> FailOutcome:
        """Log, then report a failed attempt; raises `LeaseLost`. The error text is made
        storable (NUL and lone surrogates escaped, as the database worker stores them) and
        cut to the protocol's `MAX_ERROR_CHARS`."""
        error = storable_text(error)[:MAX_ERROR_CHARS] or "failed (no message)"
        body = failure_body(step.id, step.lease_token, error=error, retryable=retryable)
        answers = await self._log_and_report([self._row(step, "failed", body)])
        answer = answers[(step.id, step.lease_token)]
        problem = _problem(answer)
        if problem is not None:
            raise problem
        now = datetime.now(UTC)
        if answer.get("retryAt"):
            retry_at = _parse_time(str(answer["retryAt"]))
            backoff_ms = max(0.0, (retry_at - now) / timedelta(milliseconds=1))
            return FailOutcome(status="ready", available_at=retry_at, backoff_ms=backoff_ms)
        return FailOutcome(status="dead_letter", available_at=now, backoff_ms=0.0)

    async def expand_map(self, step: ClaimedStep, *, max_width: int) -> MapExpansion:
        """Never called: the API expands map steps itself. Raises `ProtocolError`."""
        raise ProtocolError(
            f"map step {step.name} of run {step.run_id} reached agent {self.worker_id}: "
            f"the API expands map steps (max width {max_width}) itself"
        )

    async def release(self, leases: list[tuple[int, int]]) -> int:
        """``/agent/release``: how many leases were handed back."""
        for key in leases:
            self._lease_ends.pop(key, None)
        answer = await self._post(
            "/agent/release",
            {
                "agentId": self.worker_id,
                "leases": [{"stepId": s, "leaseToken": t} for s, t in leases],
            },
        )
        return int(answer.get("released", 0))

    async def worker_heartbeat(self, *, status: str) -> None:
        """Nothing: every ``/agent/heartbeat`` refreshes the agent's row already."""
        del status

    async def stopped(self) -> None:
        """One last try to report what the log holds, then ``/agent/stopped``."""
        try:
            pending = await asyncio.to_thread(self.log.pending)
            if pending:
                await asyncio.wait_for(self._send(pending), 5)
        except (PgdagError, TimeoutError) as exc:
            logger.warning(
                "agent %s: outcomes left in %s for the next start (%s)",
                self.worker_id,
                self.log.path,
                _first_line(exc),
            )
        await self._post("/agent/stopped", {"agentId": self.worker_id}, timeout_s=5)

    def background(self, wake: Callable[[], None]) -> list[Coroutine[Any, Any, None]]:
        """The re-sender of pending outcomes."""
        del wake  # claims long-poll: nothing to wake
        return [self._resend_loop()]

    async def close(self) -> None:
        """Close the HTTP client and the log."""
        await self._client.aclose()
        self.log.close()

    # --- reporting through the log ------------------------------------------------------

    def _row(self, step: ClaimedStep, status: str, body: str) -> LoggedOutcome:
        return LoggedOutcome(
            step_id=step.id,
            lease_token=step.lease_token,
            run_id=step.run_id,
            name=step.name,
            attempt=step.attempt,
            status=status,
            body=body,
            lease_expires_at=step.lease_expires_at.isoformat(),
        )

    async def _log_and_report(
        self, rows: list[LoggedOutcome]
    ) -> dict[tuple[int, int], dict[str, Any]]:
        """Write `rows` to the log (durably), then report them, re-sending with backoff
        while a lease lasts. Returns the API's result per key; a row whose lease ended
        unanswered gets a local ``lease_lost`` result (it stays pending in the log and the
        re-sender goes on)."""
        keys = [r.key for r in rows]
        self._reporting.update(keys)  # before the write: the re-sender must not take them
        try:
            await asyncio.to_thread(self.log.write, rows)
        except BaseException:
            self._reporting.difference_update(keys)
            raise
        results: dict[tuple[int, int], dict[str, Any]] = {}
        delay = REPORT_RETRY_FIRST_S
        try:
            todo = rows
            tries = 0
            while todo:
                tries += 1
                try:
                    await self._send(todo, results)
                    if tries > 1:
                        logger.info(
                            "agent %s: report of %d outcome(s) answered at try %d",
                            self.worker_id,
                            len(todo),
                            tries,
                        )
                    break
                except ApiUnavailable as exc:
                    now = time.monotonic()
                    todo = [r for r in todo if r.key not in results]  # not answered yet
                    lasting = [r for r in todo if self._lease_ends.get(r.key, 0) > now]
                    for r in todo:
                        if r not in lasting:
                            results[r.key] = {
                                "result": "refused",
                                "code": "lease_lost",
                                "message": f"the lease ended before the API answered ({exc});"
                                f" the outcome stays in {self.log.path} and is re-sent",
                                "local": True,
                            }
                    todo = lasting
                    if not todo:
                        break
                    logger.warning(
                        "agent %s: report of %d outcome(s) not answered (%s); re-sending in %.1fs",
                        self.worker_id,
                        len(todo),
                        _first_line(exc),
                        delay,
                    )
                    await asyncio.sleep(delay)
                    delay = min(REPORT_RETRY_MAX_S, delay * 2)
        finally:
            self._reporting.difference_update(keys)
            for key in keys:
                if key not in results or not results[key].get("local"):
                    self._lease_ends.pop(key, None)
            if len(results) < len(keys) or any(r.get("local") for r in results.values()):
                self._flush_wake.set()  # left pending: the re-sender takes over
        return results

    async def _send(
        self,
        rows: Sequence[LoggedOutcome],
        results: dict[tuple[int, int], dict[str, Any]] | None = None,
    ) -> dict[tuple[int, int], dict[str, Any]]:
        """Report `rows` (in as many requests as the caps need) and record each answer in
        the log; the results by key, also put in `results` as they come. Raises
        `ApiUnavailable` at the first request not answered (the answers before it are in
        `results` and the log: a retry sends only the others)."""
        results = {} if results is None else results
        for chunk in self._chunks(rows):
            await asyncio.to_thread(self.log.sent, [r.key for r in chunk])
            try:
                answers = await self._report(chunk)
            except ProtocolError as exc:
                if len(chunk) > 1:  # find the one the API cannot take; send the others
                    for row in chunk:
                        await self._send([row], results)
                    continue
                logger.error("agent %s: report of %s refused: %s", self.worker_id, chunk[0], exc)
                answers = [{"result": "refused", "code": "invalid_request", "message": str(exc)}]
            for row, answer in zip(chunk, answers, strict=True):
                results[row.key] = answer
            await asyncio.to_thread(
                self.log.answered,
                [
                    (
                        row.step_id,
                        row.lease_token,
                        "recorded" if answer.get("result") == "recorded" else "refused",
                        "duplicate" if answer.get("duplicate") else answer.get("code"),
                        answer.get("message"),
                    )
                    for row, answer in zip(chunk, answers, strict=True)
                ],
            )
            for row, answer in zip(chunk, answers, strict=True):
                if answer.get("result") != "recorded":
                    logger.warning(
                        "run %s step %s attempt %d (token %d): outcome refused (%s): %s",
                        row.run_id,
                        row.name,
                        row.attempt,
                        row.lease_token,
                        answer.get("code"),
                        answer.get("message"),
                    )
        return results

    async def _report(self, chunk: Sequence[LoggedOutcome]) -> list[dict[str, Any]]:
        body = (
            f'{{"agentId":{json.dumps(self.worker_id)},"outcomes":['
            + ",".join(r.body for r in chunk)
            + "]}"
        ).encode()
        answer = await self._post("/agent/report", body)
        results = answer.get("results")
        if not isinstance(results, list) or len(results) != len(chunk):
            raise ProtocolError(f"/agent/report answered {len(results or [])} results")
        return [r if isinstance(r, dict) else {} for r in results]

    def _chunks(self, rows: Iterable[LoggedOutcome]) -> list[list[LoggedOutcome]]:
        """Split into reports of at most `MAX_OUTCOMES` outcomes, each step once (two
        attempts of one step go in different reports), under the body cap."""
        cap = max(1, self.max_body_bytes - REPORT_BYTES_MARGIN)
        chunks: list[list[LoggedOutcome]] = []
        current: list[LoggedOutcome] = []
        ids: set[int] = set()
        size = 0
        leftover: list[LoggedOutcome] = []
        for row in rows:
            if row.step_id in ids:
                leftover.append(row)
                continue
            n = len(row.body.encode()) + 1
            if current and (len(current) >= MAX_OUTCOMES or size + n > cap):
                chunks.append(current)
                current, ids, size = [], set(), 0
            current.append(row)
            ids.add(row.step_id)
            size += n
        if current:
            chunks.append(current)
        if leftover:
            chunks.extend(self._chunks(leftover))
        return chunks

    async def _resend_loop(self) -> None:
        """Re-send pending outcomes no running attempt is reporting, with capped
        exponential backoff while the API does not answer; runs until cancelled."""
        delay = REPORT_RETRY_FIRST_S
        while True:
            self._flush_wake.clear()
            try:
                pending = [
                    r
                    for r in await asyncio.to_thread(self.log.pending)
                    if r.key not in self._reporting
                ]
                if pending:
                    results = await self._send(pending)
                    recorded = sum(1 for a in results.values() if a.get("result") == "recorded")
                    logger.info(
                        "agent %s: %d logged outcome(s) re-reported: %d recorded, %d refused",
                        self.worker_id,
                        len(results),
                        recorded,
                        len(results) - recorded,
                    )
                delay = REPORT_RETRY_FIRST_S
                wait_s = FLUSH_IDLE_S
            except ApiUnavailable as exc:
                logger.debug("agent %s: re-send failed: %s", self.worker_id, exc)
                wait_s = delay
                delay = min(FLUSH_RETRY_MAX_S, delay * 2)
            except Exception:  # the loop must outlive any one failure
                logger.exception("agent %s: re-send pass failed", self.worker_id)
                wait_s = delay
                delay = min(FLUSH_RETRY_MAX_S, delay * 2)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._flush_wake.wait(), wait_s)


def _problem(answer: dict[str, Any]) -> PgdagError | None:
    """The Worker's view of one report result: None (recorded), `LeaseLost`,
    `OutputRefused`, or `ProtocolError`."""
    if answer.get("result") == "recorded":
        return None
    code = answer.get("code")
    message = str(answer.get("message") or code)
    if code in ("lease_lost", "not_owner"):  # either way the attempt is not this agent's
        return LeaseLost(message)
    if code == "output_refused":
        return OutputRefused(message)
    if code == "steps_refused":
        return StepsRefused(message, problems=answer.get("problems") or [])
    return ProtocolError(message)
