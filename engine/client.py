"""The Python client of the pgdag API: `Client` (sync) and `AsyncClient` (asyncio), on httpx
and websockets, with the same methods.

    from engine.client import Client, Run

    run = Run(goal="fetch then wait")
    fetch = run.step("fetch", "HTTP_GET_JSON", url="http://127.0.0.1:4000/health")
    run.step("wait", "DELAY", ms=500, depends_on=[fetch])
    with Client("http://127.0.0.1:4000") as client:
        run_id = client.submit(run).id
        print(client.wait(run_id, timeout_s=60)["status"])

Bodies are the API's JSON as it sends it (camelCase dicts, see `engine.responses`): the
client adds no model of its own. Every POST carries ``Content-Type: application/json``
(the API requires it, even without a body) and, with a token, ``Authorization: Bearer``.

`wait` and `watch` use ``WS /ws/runs/{runId}`` (`engine.ws`), not polling: the outcome is
known the moment it commits, and a run of 10,000 steps costs one snapshot, not one read of
every step per poll. A dropped connection (an API restart, a proxy timing out) is opened
again with ``?after=<the last event id>`` for up to `reconnect_for_s`, so the events
delivered are every event of the run, each once, in order.

Errors (all `engine.errors.PgdagError`):

    PgdagApiError            an answer in the API's error shape: status, code, message, problems
    ├── Unauthorized         401: missing or wrong bearer token
    ├── Forbidden            403 forbidden: the token's scope does not allow it
    ├── NotFound             404: no such run, step or schedule
    ├── Conflict             409: the state machine does not allow it (cancel a finished run...)
    ├── InvalidRequest       422: a bad run or request; .problems names each step and field
    │   └── IdempotencyKeyReused   422: the idempotencyKey names a run with another payload
    ├── Unavailable          503: Postgres is not answering, or the schema is not migrated
    └── RequestRefused       415, 421, 405, 403: refused as sent (a proxy or a client bug)
    ApiUnreachable           no answer: connection refused, timed out, or lost for good
    WaitTimeout              `wait` ran out of time; .run_id, .last_status (also TimeoutError)
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from dataclasses import dataclass
from datetime import datetime
from types import TracebackType
from typing import Any, Literal, Self
from urllib.parse import quote, urlencode, urlsplit, urlunsplit

import httpx
from websockets.asyncio.client import ClientConnection as AsyncConnection
from websockets.asyncio.client import connect as async_connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus
from websockets.sync.client import ClientConnection as SyncConnection
from websockets.sync.client import connect as sync_connect

from engine.builder import Ref, Run, Step, index, item
from engine.errors import PgdagError
from engine.transitions import TERMINAL_RUN_STATES

TIMEOUT_S_DEFAULT = 30.0
RECONNECT_FOR_S_DEFAULT = 60.0
RECONNECT_DELAY_MIN_S = 0.1
RECONNECT_DELAY_MAX_S = 2.0
OPEN_TIMEOUT_S = 10.0
EVENTS_PAGE = 1000
MAX_MESSAGE_BYTES = 256 * 1024 * 1024  # the snapshot of a 10,000-step run is a few MB

# --- errors --------------------------------------------------------------------------------


class PgdagApiError(PgdagError):
    """The API answered with an error.

    `status` is the HTTP status (for a WebSocket refusal, the close code less 4000: 4404 is
    404), `code` the API's machine code (``not_found``, ``illegal_transition``...), `message`
    its sentence, `problems` the list of ``{"step", "field", "problem"}`` of a 422 (else
    empty). ``str()`` is ``"<message> (<status> <code>)"``.
    """

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        problems: list[dict[str, Any]] | None = None,
    ) -> None:
        self.status = status
        self.code = code
        self.message = message
        self.problems = problems or []
        super().__init__(f"{message} ({status} {code})")


class Unauthorized(PgdagApiError):
    """401: the API wants ``Authorization: Bearer <PGDAG_API_TOKEN>`` and did not get it."""


class Forbidden(PgdagApiError):
    """403 ``forbidden``: the token is known but its scope (``python -m engine token``)
    does not allow this request; the message names the token and its scope."""


class NotFound(PgdagApiError):
    """404: no such run (or step, or path)."""


class Conflict(PgdagApiError):
    """409: the run or step is not in a state that allows this (``illegal_transition``)."""


class InvalidRequest(PgdagApiError):
    """422: the run or request was refused, nothing written; `problems` names each step,
    field and problem."""


class IdempotencyKeyReused(InvalidRequest):
    """422 ``idempotency_key_reused``: the key already names a run submitted with another
    payload; use a new key for a different run."""


class Unavailable(PgdagApiError):
    """503: Postgres is not answering (``database_unavailable``) or its schema is not the
    one the API needs (``schema_not_current``: run ``python -m engine migrate``). Retry
    later."""


class RequestRefused(PgdagApiError):
    """The API refused the request as it was sent, before looking at it: a Content-Type
    that is not JSON (415), a Host it does not answer to (421: add it to
    PGDAG_ALLOWED_HOSTS), a method the path does not take (405), a WebSocket Origin it does
    not allow (403). Retrying will not help."""


class ApiUnreachable(PgdagError):
    """The API could not be reached, did not answer in time, or a WebSocket to it could
    not be opened again within the reconnect window."""


class WaitTimeout(PgdagError, TimeoutError):
    """`wait` ran out of time before the run ended; `run_id` and `last_status` (the run's
    status when it gave up) say where it was, `timeout_s` how long it waited."""

    def __init__(self, run_id: str, last_status: str | None, timeout_s: float) -> None:
        self.run_id = run_id
        self.last_status = last_status
        self.timeout_s = timeout_s
        super().__init__(
            f"run {run_id} did not finish within {timeout_s:g} s "
            f"(last status: {last_status or 'unknown'})"
        )


_BY_STATUS: dict[int, type[PgdagApiError]] = {
    401: Unauthorized,
    404: NotFound,
    409: Conflict,
    422: InvalidRequest,
    503: Unavailable,
    **dict.fromkeys((403, 405, 415, 421), RequestRefused),
}


def api_error(status: int, body: Any, text: str = "") -> PgdagApiError:
    """The typed error for an answer with HTTP `status` and decoded `body` (the API's
    ``{"error", "message", "problems"?}``; anything else, e.g. a proxy's HTML page, gives
    code ``http_<status>`` and the start of `text` as the message). A status with no class
    of its own (a 500, a proxy's 502 or 429) gives a `PgdagApiError`."""
    if isinstance(body, dict) and isinstance(body.get("error"), str):
        code = body["error"]
        message = str(body.get("message") or code)
        problems = body.get("problems") if isinstance(body.get("problems"), list) else None
    else:
        code = f"http_{status}"
        message = text.strip()[:300] or f"HTTP {status}"
        problems = None
    cls: type[PgdagApiError]
    if code == "idempotency_key_reused":
        cls = IdempotencyKeyReused
    elif status == 403 and code == "forbidden":
        cls = Forbidden
    else:
        cls = _BY_STATUS.get(status, PgdagApiError)
    return cls(status, code, message, problems)


def _raise_for(response: httpx.Response) -> Any:
    """The decoded body of a 2xx answer; the typed error of any other."""
    try:
        body = response.json()
    except ValueError:
        body = None
    if response.is_success:
        return body
    raise api_error(response.status_code, body, response.text)


# --- what both clients share ---------------------------------------------------------------


@dataclass(frozen=True)
class Submitted:
    """What `submit` returns: the `run` as the API answered (the ``GET /runs/{runId}``
    body) and whether this call `created` it (False: a run with the same idempotencyKey and
    payload existed; the API answered 200, not 201)."""

    run: dict[str, Any]
    created: bool

    @property
    def id(self) -> str:
        """The run's id."""
        run_id: str = self.run["id"]
        return run_id


def _body(run: Run | Mapping[str, Any], idempotency_key: str | None) -> dict[str, Any]:
    if isinstance(run, Run):
        body = run.to_dict()
    elif isinstance(run, Mapping):
        body = dict(run)
    else:
        raise TypeError(f"submit takes a Run or a dict (the POST /runs body), not {run!r}")
    if idempotency_key is not None:
        body["idempotencyKey"] = idempotency_key
    return body


def _run_path(run_id: str | uuid.UUID, *rest: str) -> str:
    return "/".join(["/runs", quote(str(run_id), safe=""), *(quote(p, safe="") for p in rest)])


def _schedule_path(ref: str | uuid.UUID, *rest: str) -> str:
    """``/schedules/{scheduleId}[/rest]``: `ref` is the schedule's id or its name."""
    return "/".join(["/schedules", quote(str(ref), safe=""), *rest])


def _time(name: str, value: datetime | str | None) -> str | None:
    if value is None or isinstance(value, str):
        return value
    if value.tzinfo is None or value.utcoffset() is None:
        raise ValueError(f"{name}: a datetime without a time zone is ambiguous; give tzinfo")
    return value.isoformat()


def _dead_letter_filters(
    tool: str | None,
    run_status: Literal["running", "failed"] | None,
    since: datetime | str | None,
    until: datetime | str | None,
    limit: int | None,
    dry_run: bool,
    reason: str | None,
) -> dict[str, Any]:
    body = {
        "tool": tool,
        "runStatus": run_status,
        "since": _time("since", since),
        "until": _time("until", until),
        "limit": limit,
        "reason": reason,
    }
    out = {k: v for k, v in body.items() if v is not None}
    if dry_run:
        out["dryRun"] = True
    return out


class _Stream:
    """The state of following one run over ``WS /ws/runs/{runId}``, whatever the I/O:
    where to resume, which events were delivered, and whether the run has ended.

    `take` turns one frame into the messages to deliver: the ``snapshot`` (the first
    connection only, or after a ``resync``), each ``event`` (a ``?batch=1`` frame is
    split; an event already delivered is dropped), a ``resync`` notice. It raises the
    typed error of an ``error`` frame that waiting cannot cure.
    """

    def __init__(self, run_id: str) -> None:
        self.run_id = run_id
        self.after: int | None = None  # set by the first snapshot
        self.status: str | None = None
        self.seen: set[int] = set()

    @property
    def done(self) -> bool:
        return self.status in TERMINAL_RUN_STATES

    def url(self, ws_base: str) -> str:
        params: dict[str, str | int] = {"batch": 1}
        if self.after is not None:
            params["after"] = self.after
        return f"{ws_base}/ws/runs/{quote(self.run_id, safe='')}?{urlencode(params)}"

    def _event(self, event: dict[str, Any]) -> list[dict[str, Any]]:
        event_id = int(event["id"])
        if event_id in self.seen:
            return []
        self.seen.add(event_id)
        self.after = max(self.after or 0, event_id)
        if event.get("stepName") is None and event.get("toStatus"):
            self.status = event["toStatus"]
        return [{"type": "event", "event": event}]

    def take(self, raw: str | bytes) -> list[dict[str, Any]]:
        message = json.loads(raw)
        kind = message.get("type")
        if kind == "snapshot":
            self.after = max(self.after or 0, int(message["lastEventId"]))
            self.status = message["run"]["status"]
            return [message]
        if kind == "event":
            return self._event(message["event"])
        if kind == "events":
            return [out for event in message["events"] for out in self._event(event)]
        if kind == "resync":
            return [message]
        if kind == "error":
            code = str(message.get("error") or "error")
            if code == "unavailable":  # closed with 1013 next: try again
                return []
            text = str(message.get("message") or code)
            status = {"not_found": 404, "invalid_request": 422, "unauthorized": 401}.get(code, 500)
            raise api_error(status, {"error": code, "message": text})
        return []  # a message type this client does not know: skipped

    def closed_error(self, exc: ConnectionClosed) -> PgdagApiError | None:
        """The error a close code means (4401, 4403, 4404, 4400); None for a dropped link."""
        code = exc.rcvd.code if exc.rcvd is not None else None
        reason = exc.rcvd.reason if exc.rcvd is not None else ""
        if code == 4401:
            return Unauthorized(401, "unauthorized", "missing or wrong bearer token")
        if code == 4403:
            return Forbidden(403, "forbidden", "the token's scope may not read this run's events")
        if code == 4404:
            return NotFound(404, "not_found", reason or f"no run {self.run_id}")
        if code == 4400:
            return RequestRefused(400, "invalid_request", reason or "bad query parameter")
        return None


def _handshake_error(exc: InvalidStatus) -> PgdagApiError:
    response = exc.response
    text = response.body.decode(errors="replace") if response.body else ""
    try:
        body = json.loads(text) if text else None
    except ValueError:
        body = None
    return api_error(response.status_code, body, text or f"WebSocket refused ({exc})")


class _Base:
    def __init__(self, base_url: str, token: str | None, reconnect_for_s: float) -> None:
        parts = urlsplit(base_url.rstrip("/"))
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ValueError(f"base_url must be http(s)://host[:port], not {base_url!r}")
        self.base_url = base_url.rstrip("/")
        self.token = token
        self.reconnect_for_s = reconnect_for_s
        ws_scheme = "wss" if parts.scheme == "https" else "ws"
        self._ws_base = urlunsplit((ws_scheme, parts.netloc, parts.path, "", ""))

    def _headers(self, *, post: bool = False) -> dict[str, str]:
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
        if post:
            headers["Content-Type"] = "application/json"
        return headers

    def _unreachable(self, exc: Exception) -> ApiUnreachable:
        return ApiUnreachable(f"cannot reach the API at {self.base_url}: {exc}")


def _remaining(deadline: float | None) -> float | None:
    """Seconds left before `deadline` (a `time.monotonic` value); raises `TimeoutError`
    when none are."""
    if deadline is None:
        return None
    left = deadline - time.monotonic()
    if left <= 0:
        raise TimeoutError
    return left


def _open_timeout(deadline: float | None) -> float:
    left = _remaining(deadline)
    return OPEN_TIMEOUT_S if left is None else min(OPEN_TIMEOUT_S, left)


# --- sync ----------------------------------------------------------------------------------


class Client(_Base):
    """The pgdag API at `base_url` (``http://host:port``), with bearer `token` when the API
    has ``PGDAG_API_TOKEN``. `timeout_s`: seconds an HTTP request may take.
    `reconnect_for_s`: how long `watch` / `wait` keep trying to reopen a dropped WebSocket.
    `http_client`: an `httpx.Client` of your own (proxies, certificates, event hooks); it
    is not closed by `close`. Use as a context manager, or call `close`.

    Every method raises `ApiUnreachable` when the API does not answer and a
    `PgdagApiError` subclass for an error answer (see the module docstring).
    """

    def __init__(
        self,
        base_url: str,
        token: str | None = None,
        *,
        timeout_s: float = TIMEOUT_S_DEFAULT,
        reconnect_for_s: float = RECONNECT_FOR_S_DEFAULT,
        http_client: httpx.Client | None = None,
    ) -> None:
        super().__init__(base_url, token, reconnect_for_s)
        self._own = http_client is None
        self._http = http_client or httpx.Client(timeout=timeout_s)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        """Close the HTTP connections (not those of an `http_client` passed in)."""
        if self._own:
            self._http.close()

    def _send(
        self,
        method: str,
        path: str,
        *,
        body: Any = None,
        params: Mapping[str, Any] | None = None,
        key: str | None = None,
    ) -> httpx.Response:
        post = method in ("POST", "DELETE")  # state changes say Content-Type: json
        content = json.dumps(body).encode() if body is not None else b"" if post else None
        headers = self._headers(post=post)
        if key is not None:
            headers["Idempotency-Key"] = key
        try:
            response = self._http.request(
                method,
                self.base_url + path,
                content=content,
                params=params,
                headers=headers,
            )
        except httpx.TransportError as exc:
            raise self._unreachable(exc) from exc
        _raise_for(response)
        return response

    def _call(self, method: str, path: str, **kwargs: Any) -> dict[str, Any]:
        body: dict[str, Any] = self._send(method, path, **kwargs).json()
        return body

    def submit(
        self, run: Run | Mapping[str, Any], *, idempotency_key: str | None = None
    ) -> Submitted:
        """``POST /runs``: submit `run` (a `Run`, or the body as a dict); `idempotency_key`
        sets the body's ``idempotencyKey``. Returns `Submitted` (the run, and whether it was
        created now). Raises `InvalidRequest` (.problems) for a bad graph and
        `IdempotencyKeyReused` for a key already used with another payload."""
        response = self._send("POST", "/runs", body=_body(run, idempotency_key))
        return Submitted(response.json(), created=response.status_code == 201)

    def get(self, run_id: str | uuid.UUID) -> dict[str, Any]:
        """``GET /runs/{runId}``: the run with every step. Raises `NotFound`."""
        return self._call("GET", _run_path(run_id))

    def events(
        self, run_id: str | uuid.UUID, after: int | None = None, *, page_size: int = EVENTS_PAGE
    ) -> list[dict[str, Any]]:
        """The run's audit log, oldest first: every event with an id above `after` (all when
        None), read `page_size` (1..10,000) at a time with ``GET /runs/{runId}/events?after=``.
        Raises `NotFound`, `InvalidRequest` for a `page_size` out of range."""
        out: list[dict[str, Any]] = []
        cursor = after or 0
        while True:
            page = self._call(
                "GET",
                _run_path(run_id, "events"),
                params={"after": cursor, "limit": page_size},
            )["events"]
            out.extend(page)
            if len(page) < page_size:
                return out
            cursor = page[-1]["id"]

    def signal(
        self,
        run_id: str | uuid.UUID,
        signal: str,
        payload: Mapping[str, Any] | None = None,
        *,
        signal_id: str | None = None,
    ) -> dict[str, Any]:
        """``POST /runs/{runId}/signals/{signal}``: send `signal` with `payload` (a JSON
        object; default ``{}``) to the run, completing the wait step that waits for it.
        `signal_id` is sent as the ``Idempotency-Key`` header: the same id twice is recorded
        once (the API makes one up when absent). Returns the signal as recorded (``id``,
        ``consumedBy``: the step it completed, or None while kept for a step not reached
        yet; ``stepStatus``; ``repeated``). Raises `NotFound` (unknown run), `Conflict` (the
        run has finished, no step waits for `signal`, or that step has ended),
        `InvalidRequest`."""
        return self._call(
            "POST",
            _run_path(run_id, "signals", signal),
            body=dict(payload or {}),
            key=signal_id,
        )

    def cancel(self, run_id: str | uuid.UUID) -> dict[str, Any]:
        """``POST /runs/{runId}/cancel``: the run, cancelled. Raises `Conflict` when it has
        finished, `NotFound`."""
        return self._call("POST", _run_path(run_id, "cancel"))

    def retry(self, run_id: str | uuid.UUID, step_name: str) -> dict[str, Any]:
        """``POST /runs/{runId}/steps/{stepName}/retry``: put a ``dead_letter`` step back to
        ready (a map child is ``name[i]``); the run. Raises `Conflict` for a step not in
        dead_letter, `NotFound`."""
        return self._call("POST", _run_path(run_id, "steps", step_name, "retry"))

    def replay(
        self, run_id: str | uuid.UUID, from_step: str, *, reason: str | None = None
    ) -> dict[str, Any]:
        """``POST /runs/{runId}/replay``: run `from_step` and everything downstream of it
        again (upstream outputs are reused); `reason` goes to the audit log. The run.
        Raises `Conflict` (cancelled run, a step to reset still running), `NotFound`."""
        body = {"from": from_step, **({"reason": reason} if reason is not None else {})}
        return self._call("POST", _run_path(run_id, "replay"), body=body)

    def retry_dead_letters(
        self,
        *,
        tool: str | None = None,
        run_status: Literal["running", "failed"] | None = None,
        since: datetime | str | None = None,
        until: datetime | str | None = None,
        limit: int | None = None,
        dry_run: bool = False,
        reason: str | None = None,
    ) -> dict[str, Any]:
        """``POST /runs/retry-dead-letters``: retry the dead letters matching every filter
        given, oldest first, at most `limit` (API default 1,000). `since` / `until` bound
        when they were dead-lettered (aware datetimes or ISO 8601 strings). `dry_run` only
        lists them. Returns ``{"dryRun", "matched", "retried": [{"runId", "stepName"}],
        "refused": [... "reason"]}``. Raises `InvalidRequest` naming a bad filter,
        `ValueError` for a naive datetime."""
        body = _dead_letter_filters(tool, run_status, since, until, limit, dry_run, reason)
        return self._call("POST", "/runs/retry-dead-letters", body=body)

    # --- schedules (docs/schedules.md) ---------------------------------------------------

    def create_schedule(self, schedule: Mapping[str, Any]) -> tuple[dict[str, Any], bool]:
        """``POST /schedules``: create `schedule` (``{"name", "cron", "timezone", "run",
        "missed"}``). Returns ``(schedule, created)``; `created` False: a schedule of that
        name and definition existed. Raises `InvalidRequest` (.problems: ``cron``,
        ``timezone``, ``run.steps[0].tool``...), `Conflict` for a name another definition
        has."""
        response = self._send("POST", "/schedules", body=dict(schedule))
        body: dict[str, Any] = response.json()
        return body, response.status_code == 201

    def schedules(self) -> list[dict[str, Any]]:
        """``GET /schedules``: every schedule by name, each with its ``lastFire``."""
        listed: list[dict[str, Any]] = self._call("GET", "/schedules")["schedules"]
        return listed

    def schedule(self, ref: str | uuid.UUID) -> dict[str, Any]:
        """``GET /schedules/{scheduleId}`` (id or name): the schedule and its
        ``recentFires``. Raises `NotFound`."""
        return self._call("GET", _schedule_path(ref))

    def pause_schedule(self, ref: str | uuid.UUID) -> dict[str, Any]:
        """``POST /schedules/{scheduleId}/pause``: the schedule, paused. Raises `Conflict`
        when it was, `NotFound`."""
        return self._call("POST", _schedule_path(ref, "pause"))

    def resume_schedule(self, ref: str | uuid.UUID) -> dict[str, Any]:
        """``POST /schedules/{scheduleId}/resume``: the schedule, its next fire the first
        after now. Raises `Conflict` when it was not paused, `NotFound`."""
        return self._call("POST", _schedule_path(ref, "resume"))

    def delete_schedule(self, ref: str | uuid.UUID) -> dict[str, Any]:
        """``DELETE /schedules/{scheduleId}``: ``{"id", "deleted": true}`` (its runs stay).
        Raises `NotFound`."""
        return self._call("DELETE", _schedule_path(ref))

    def wait(self, run_id: str | uuid.UUID, timeout_s: float) -> dict[str, Any]:
        """Block until the run is completed, failed or cancelled (over the WebSocket, see
        the module docstring); return it as `get` does. Raises `WaitTimeout` after
        `timeout_s` seconds, `NotFound` for an unknown run."""
        stream = _Stream(str(run_id))
        deadline = time.monotonic() + timeout_s
        last: dict[str, Any] | None = None
        try:
            for message in self._follow(stream, deadline=deadline, on_disconnect=None):
                if message["type"] == "snapshot":
                    last = message["run"]
        except TimeoutError:
            raise WaitTimeout(str(run_id), stream.status, timeout_s) from None
        if last is not None and last["status"] == stream.status:
            return last  # the snapshot showed it finished already
        return self.get(run_id)

    def watch(
        self,
        run_id: str | uuid.UUID,
        *,
        on_disconnect: Callable[[Exception], None] | None = None,
    ) -> Iterator[dict[str, Any]]:
        """Follow the run over ``WS /ws/runs/{runId}``: yields ``{"type": "snapshot", "run":
        ..., "lastEventId": N}`` first, then ``{"type": "event", "event": {...}}`` for each
        of its events in order (and ``{"type": "resync", ...}`` followed by a fresh snapshot
        if it fell too far behind). Ends after the event that finishes the run (at once if
        the snapshot shows it finished).

        A dropped connection calls `on_disconnect` with the error, then is reopened with
        ``?after=<last event id>`` for up to `reconnect_for_s`: no event is lost or
        repeated. Raises `NotFound`, `Unauthorized`, and `ApiUnreachable` when the first
        connection fails or no reconnection succeeds in time."""
        return self._follow(_Stream(str(run_id)), deadline=None, on_disconnect=on_disconnect)

    def _connect(self, stream: _Stream, deadline: float | None) -> SyncConnection:
        return sync_connect(
            stream.url(self._ws_base),
            additional_headers=self._headers(),
            max_size=MAX_MESSAGE_BYTES,
            compression=None,
            open_timeout=_open_timeout(deadline),
        )

    def _follow(
        self,
        stream: _Stream,
        *,
        deadline: float | None,
        on_disconnect: Callable[[Exception], None] | None,
    ) -> Iterator[dict[str, Any]]:
        dropped_at: float | None = None  # None: connected (or never yet)
        delay = RECONNECT_DELAY_MIN_S
        while True:
            try:
                ws = self._connect(stream, deadline)
            except InvalidStatus as exc:
                error = _handshake_error(exc)
                if dropped_at is None or error.status in (401, 404, 421):
                    self._explain_refusal(stream.run_id, error)
                    raise error from None
                last_error: Exception = error
            except (OSError, InvalidHandshake, TimeoutError) as exc:
                _remaining(deadline)  # TimeoutError when wait's time is up
                if dropped_at is None:
                    raise self._unreachable(exc) from None
                last_error = exc
            else:
                with ws:
                    try:
                        while True:
                            raw = ws.recv(timeout=_remaining(deadline))
                            dropped_at, delay = None, RECONNECT_DELAY_MIN_S  # it works again
                            yield from stream.take(raw)
                            if stream.done:
                                return
                    except ConnectionClosed as exc:
                        error_ = stream.closed_error(exc)
                        if error_ is not None:
                            raise error_ from None
                        last_error = exc
                        if dropped_at is None:  # not when a reopened socket closes at once
                            dropped_at = time.monotonic()
                            if on_disconnect is not None:
                                on_disconnect(exc)
            if time.monotonic() - dropped_at > self.reconnect_for_s:
                raise ApiUnreachable(
                    f"lost the WebSocket of run {stream.run_id} at {self.base_url} and could "
                    f"not reopen it within {self.reconnect_for_s:g} s: {last_error}"
                )
            left = _remaining(deadline)
            time.sleep(delay if left is None else min(delay, left))
            delay = min(delay * 2, RECONNECT_DELAY_MAX_S)

    def _explain_refusal(self, run_id: str, error: PgdagApiError) -> None:
        """A handshake refused without the API's error shape (a 403 while the schema is not
        migrated): the same request over HTTP says why, as its typed error."""
        if error.code.startswith("http_"):
            self.get(run_id)


# --- async ---------------------------------------------------------------------------------


class AsyncClient(_Base):
    """`Client` for asyncio: the same constructor (`http_client` an `httpx.AsyncClient`)
    and methods, awaited (``await client.get(id)``); `watch` is an async iterator
    (``async for message in client.watch(id)``). Use ``async with``, or await `aclose`."""

    def __init__(
        self,
        base_url: str,
        token: str | None = None,
        *,
        timeout_s: float = TIMEOUT_S_DEFAULT,
        reconnect_for_s: float = RECONNECT_FOR_S_DEFAULT,
        http_client: httpx.AsyncClient | None = None,
    ) -> None:
        super().__init__(base_url, token, reconnect_for_s)
        self._own = http_client is None
        self._http = http_client or httpx.AsyncClient(timeout=timeout_s)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close the HTTP connections (not those of an `http_client` passed in)."""
        if self._own:
            await self._http.aclose()

    async def _send(
        self,
        method: str,
        path: str,
        *,
        body: Any = None,
        params: Mapping[str, Any] | None = None,
        key: str | None = None,
    ) -> httpx.Response:
        post = method in ("POST", "DELETE")  # state changes say Content-Type: json
        content = json.dumps(body).encode() if body is not None else b"" if post else None
        headers = self._headers(post=post)
        if key is not None:
            headers["Idempotency-Key"] = key
        try:
            response = await self._http.request(
                method,
                self.base_url + path,
                content=content,
                params=params,
                headers=headers,
            )
        except httpx.TransportError as exc:
            raise self._unreachable(exc) from exc
        _raise_for(response)
        return response

    async def _call(self, method: str, path: str, **kwargs: Any) -> dict[str, Any]:
        body: dict[str, Any] = (await self._send(method, path, **kwargs)).json()
        return body

    async def submit(
        self, run: Run | Mapping[str, Any], *, idempotency_key: str | None = None
    ) -> Submitted:
        """See `Client.submit`."""
        response = await self._send("POST", "/runs", body=_body(run, idempotency_key))
        return Submitted(response.json(), created=response.status_code == 201)

    async def get(self, run_id: str | uuid.UUID) -> dict[str, Any]:
        """See `Client.get`."""
        return await self._call("GET", _run_path(run_id))

    async def events(
        self, run_id: str | uuid.UUID, after: int | None = None, *, page_size: int = EVENTS_PAGE
    ) -> list[dict[str, Any]]:
        """See `Client.events`."""
        out: list[dict[str, Any]] = []
        cursor = after or 0
        while True:
            page = (
                await self._call(
                    "GET",
                    _run_path(run_id, "events"),
                    params={"after": cursor, "limit": page_size},
                )
            )["events"]
            out.extend(page)
            if len(page) < page_size:
                return out
            cursor = page[-1]["id"]

    async def signal(
        self,
        run_id: str | uuid.UUID,
        signal: str,
        payload: Mapping[str, Any] | None = None,
        *,
        signal_id: str | None = None,
    ) -> dict[str, Any]:
        """See `Client.signal`."""
        return await self._call(
            "POST",
            _run_path(run_id, "signals", signal),
            body=dict(payload or {}),
            key=signal_id,
        )

    async def cancel(self, run_id: str | uuid.UUID) -> dict[str, Any]:
        """See `Client.cancel`."""
        return await self._call("POST", _run_path(run_id, "cancel"))

    async def retry(self, run_id: str | uuid.UUID, step_name: str) -> dict[str, Any]:
        """See `Client.retry`."""
        return await self._call("POST", _run_path(run_id, "steps", step_name, "retry"))

    async def replay(
        self, run_id: str | uuid.UUID, from_step: str, *, reason: str | None = None
    ) -> dict[str, Any]:
        """See `Client.replay`."""
        body = {"from": from_step, **({"reason": reason} if reason is not None else {})}
        return await self._call("POST", _run_path(run_id, "replay"), body=body)

    async def retry_dead_letters(
        self,
        *,
        tool: str | None = None,
        run_status: Literal["running", "failed"] | None = None,
        since: datetime | str | None = None,
        until: datetime | str | None = None,
        limit: int | None = None,
        dry_run: bool = False,
        reason: str | None = None,
    ) -> dict[str, Any]:
        """See `Client.retry_dead_letters`."""
        body = _dead_letter_filters(tool, run_status, since, until, limit, dry_run, reason)
        return await self._call("POST", "/runs/retry-dead-letters", body=body)

    # --- schedules ------------------------------------------------------------------------

    async def create_schedule(self, schedule: Mapping[str, Any]) -> tuple[dict[str, Any], bool]:
        """See `Client.create_schedule`."""
        response = await self._send("POST", "/schedules", body=dict(schedule))
        body: dict[str, Any] = response.json()
        return body, response.status_code == 201

    async def schedules(self) -> list[dict[str, Any]]:
        """See `Client.schedules`."""
        listed: list[dict[str, Any]] = (await self._call("GET", "/schedules"))["schedules"]
        return listed

    async def schedule(self, ref: str | uuid.UUID) -> dict[str, Any]:
        """See `Client.schedule`."""
        return await self._call("GET", _schedule_path(ref))

    async def pause_schedule(self, ref: str | uuid.UUID) -> dict[str, Any]:
        """See `Client.pause_schedule`."""
        return await self._call("POST", _schedule_path(ref, "pause"))

    async def resume_schedule(self, ref: str | uuid.UUID) -> dict[str, Any]:
        """See `Client.resume_schedule`."""
        return await self._call("POST", _schedule_path(ref, "resume"))

    async def delete_schedule(self, ref: str | uuid.UUID) -> dict[str, Any]:
        """See `Client.delete_schedule`."""
        return await self._call("DELETE", _schedule_path(ref))

    async def wait(self, run_id: str | uuid.UUID, timeout_s: float) -> dict[str, Any]:
        """See `Client.wait`."""
        stream = _Stream(str(run_id))
        deadline = time.monotonic() + timeout_s
        last: dict[str, Any] | None = None
        try:
            async for message in self._follow(stream, deadline=deadline, on_disconnect=None):
                if message["type"] == "snapshot":
                    last = message["run"]
        except TimeoutError:
            raise WaitTimeout(str(run_id), stream.status, timeout_s) from None
        if last is not None and last["status"] == stream.status:
            return last
        return await self.get(run_id)

    def watch(
        self,
        run_id: str | uuid.UUID,
        *,
        on_disconnect: Callable[[Exception], None] | None = None,
    ) -> AsyncIterator[dict[str, Any]]:
        """See `Client.watch`: the same messages, as an async iterator."""
        return self._follow(_Stream(str(run_id)), deadline=None, on_disconnect=on_disconnect)

    async def _connect(self, stream: _Stream, deadline: float | None) -> AsyncConnection:
        return await async_connect(
            stream.url(self._ws_base),
            additional_headers=self._headers(),
            max_size=MAX_MESSAGE_BYTES,
            compression=None,
            open_timeout=_open_timeout(deadline),
        )

    async def _follow(
        self,
        stream: _Stream,
        *,
        deadline: float | None,
        on_disconnect: Callable[[Exception], None] | None,
    ) -> AsyncIterator[dict[str, Any]]:
        dropped_at: float | None = None
        delay = RECONNECT_DELAY_MIN_S
        while True:
            try:
                ws = await self._connect(stream, deadline)
            except InvalidStatus as exc:
                error = _handshake_error(exc)
                if dropped_at is None or error.status in (401, 404, 421):
                    if error.code.startswith("http_"):
                        await self.get(stream.run_id)
                    raise error from None
                last_error: Exception = error
            except (OSError, InvalidHandshake, TimeoutError) as exc:
                _remaining(deadline)
                if dropped_at is None:
                    raise self._unreachable(exc) from None
                last_error = exc
            else:
                async with ws:
                    try:
                        while True:
                            async with asyncio.timeout(_remaining(deadline)):
                                raw = await ws.recv()
                            dropped_at, delay = None, RECONNECT_DELAY_MIN_S
                            for message in stream.take(raw):
                                yield message
                            if stream.done:
                                return
                    except ConnectionClosed as exc:
                        error_ = stream.closed_error(exc)
                        if error_ is not None:
                            raise error_ from None
                        last_error = exc
                        if dropped_at is None:
                            dropped_at = time.monotonic()
                            if on_disconnect is not None:
                                on_disconnect(exc)
            if time.monotonic() - dropped_at > self.reconnect_for_s:
                raise ApiUnreachable(
                    f"lost the WebSocket of run {stream.run_id} at {self.base_url} and could "
                    f"not reopen it within {self.reconnect_for_s:g} s: {last_error}"
                )
            left = _remaining(deadline)
            await asyncio.sleep(delay if left is None else min(delay, left))
            delay = min(delay * 2, RECONNECT_DELAY_MAX_S)


__all__ = [
    "ApiUnreachable",
    "AsyncClient",
    "Client",
    "Conflict",
    "Forbidden",
    "IdempotencyKeyReused",
    "InvalidRequest",
    "NotFound",
    "PgdagApiError",
    "Ref",
    "RequestRefused",
    "Run",
    "Step",
    "Submitted",
    "Unauthorized",
    "Unavailable",
    "WaitTimeout",
    "api_error",
    "index",
    "item",
]
