"""The WebSocket endpoints: ``WS /ws/runs/{runId}`` (one run) and ``WS /ws`` (every run).

Messages are JSON text frames. An *event* is exactly one item of
``GET /runs/{runId}/events`` (`engine.store.event_json`: id, runId, stepName, event,
fromStatus, toStatus, attempt, leaseToken, workerId, detail, at).

``/ws/runs/{runId}``
    1. ``{"type": "snapshot", "run": <the GET /runs/{runId} body>, "lastEventId": N}``:
       the run read under one snapshot, which includes every event of the run with
       id <= N and none with a larger id.
    2. ``{"type": "event", "event": {...}}`` for each later event of the run, in id order
       (see `engine.live` for why that is commit order wherever it matters).

    With ``?after=E`` there is no snapshot: the events of the run with id > E are replayed
    from the audit log, oldest first, then live ones follow, with nothing missing or
    repeated (more than `REPLAY_MAX_EVENTS` to replay: a ``resync`` and a snapshot instead).
    An unknown run gets ``{"type": "error", "error": "not_found", ...}`` and close code 4404.

``/ws``
    1. ``{"type": "hello", "lastEventId": N}``: events with id <= N were committed before
       you connected; every event with a larger id follows.
    2. ``{"type": "event", "event": {...}}`` for every event of every run, in id order.

    With ``?after=E``, the events with E < id <= N are replayed (after the hello) before the
    live ones; more than `REPLAY_MAX_EVENTS`: a ``resync`` instead.

``{"type": "resync", "reason": "slow_client" | "replay_too_long", ...}``
    Sent when the client fell too far behind (its queue overflowed and was dropped) or asked
    for too long a replay. On ``/ws/runs/{id}`` a fresh snapshot follows at once. On ``/ws``
    it carries ``"lastEventId": N``: refetch ``GET /runs`` (and the run you show) over
    HTTP; every event with id > N follows.

``?batch=1`` (either endpoint): events come as ``{"type": "events", "events": [...]}``, all
the events queued for you at that moment (at most `BATCH_MAX_EVENTS`) in one frame, in
the same order. For clients that follow many events: a frame costs the server about as
much as an event.

Both endpoints honour ``PGDAG_API_TOKEN`` and the scoped tokens (`engine.guards.BearerAuth`:
close 4401, 4403 for a scope without them, 1013 when Postgres cannot say) and refuse
a Host the API does not answer to (HTTP 421 at the handshake) and a browser ``Origin`` whose
host is not one of those nor in ``PGDAG_CORS_ORIGINS`` (HTTP 403; `engine.guards`). Other
close codes: 4400 a bad query parameter, 1013 the database or the live feed is
unavailable (try again later). Messages from the client are read and ignored.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import uuid
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

from starlette.websockets import WebSocket, WebSocketDisconnect

from engine import metrics
from engine.db import RETRYABLE
from engine.errors import NotFound
from engine.live import EventHub, LiveEvent, Subscription, batch_message
from engine.store import Store

logger = logging.getLogger(__name__)

REPLAY_MAX_EVENTS = 10_000
BATCH_MAX_EVENTS = 500
SNAPSHOT_TRIES = 5
SNAPSHOT_WAIT_S = 10.0
READY_WAIT_S = 10.0

CLOSE_BAD_REQUEST = 4400
CLOSE_NOT_FOUND = 4404
CLOSE_TRY_AGAIN_LATER = 1013


class _Unavailable(Exception):
    """The live feed did not catch up in time."""


class _Stream:
    """One client's socket and subscription. `floor` is set at each synchronisation point
    (snapshot, hello, replay, resync): the client has every event with an id at or below
    it, so live events there (late ones excepted) are not sent again."""

    def __init__(self, websocket: WebSocket, sub: Subscription, *, batch: bool) -> None:
        self.websocket = websocket
        self.sub = sub
        self.batch = batch
        self.floor = 0

    async def send(self, message: dict[str, Any]) -> None:
        await self.websocket.send_text(json.dumps(message))

    async def send_events(self, events: Iterable[LiveEvent], *, replay: bool = False) -> None:
        """Send `events` in order; live ones at or below `floor` are skipped."""
        todo = list(events) if replay else [e for e in events if e.late or e.id > self.floor]
        if self.batch:
            for i in range(0, len(todo), BATCH_MAX_EVENTS):
                await self.websocket.send_text(batch_message(todo[i : i + BATCH_MAX_EVENTS]))
        else:
            for event in todo:
                await self.websocket.send_text(event.message)

    def _all_new(self, events: list[LiveEvent]) -> bool:
        """No event of `events` (in id order, late ones aside) is at or below `floor`."""
        for event in events:
            if not event.late:
                return event.id > self.floor
        return True

    async def pump(self, on_overflow: Callable[[], Awaitable[None]]) -> None:
        """Forward queued events until the client goes away; resynchronise on overflow."""
        limit = BATCH_MAX_EVENTS if self.batch else 64
        while True:
            await self.sub.wait()
            if self.sub.overflowed:
                await on_overflow()
            elif self.batch:
                events, text = self.sub.take_batch(limit)
                if not events:
                    continue
                if self._all_new(events):  # the common case: the frame shared by everyone
                    await self.websocket.send_text(text)
                else:
                    await self.send_events(events)
            else:
                await self.send_events(self.sub.take(limit))


# --- helpers --------------------------------------------------------------------------------


async def _close(websocket: WebSocket, code: int, error: str, message: str) -> None:
    with contextlib.suppress(WebSocketDisconnect, RuntimeError, OSError):
        await websocket.send_text(json.dumps({"type": "error", "error": error, "message": message}))
        await websocket.close(code, message[:120])


def _query_int(websocket: WebSocket, name: str) -> int | None:
    raw = websocket.query_params.get(name)
    if raw is None or raw == "":
        return None
    value = int(raw)  # ValueError: the caller closes with 4400
    if value < 0:
        raise ValueError(f"{name} must be >= 0")
    return value


async def _open(websocket: WebSocket) -> tuple[EventHub, Store, int | None, bool] | None:
    """Accept, parse ``after`` and ``batch``, wait for the live feed; None when the socket
    was closed instead. (Host and Origin were checked by `engine.guards.HostGuard`.)"""
    await websocket.accept()
    try:
        after = _query_int(websocket, "after")
    except ValueError:
        await _close(
            websocket,
            CLOSE_BAD_REQUEST,
            "invalid_request",
            f"after must be an integer >= 0, got {websocket.query_params.get('after')!r}",
        )
        return None
    batch = websocket.query_params.get("batch", "").lower() in ("1", "true", "yes")
    hub: EventHub = websocket.app.state.hub
    store: Store = websocket.app.state.store
    try:
        await asyncio.wait_for(hub.ready.wait(), READY_WAIT_S)
    except TimeoutError:
        await _close(websocket, CLOSE_TRY_AGAIN_LATER, "unavailable", "live events not ready")
        return None
    return hub, store, after, batch


async def _serve(stream: _Stream, on_overflow: Callable[[], Awaitable[None]]) -> None:
    """Pump events while reading (and ignoring) what the client sends, until it leaves."""

    async def until_disconnect() -> None:
        while True:
            message = await stream.websocket.receive()
            if message["type"] == "websocket.disconnect":
                return

    tasks = {
        asyncio.create_task(until_disconnect()),
        asyncio.create_task(stream.pump(on_overflow)),
    }
    try:
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, WebSocketDisconnect, OSError):
                await task
    for task in done:
        exc = task.exception()
        if exc is not None and not isinstance(exc, WebSocketDisconnect | OSError):
            raise exc


async def _guarded(websocket: WebSocket, body: Callable[[], Awaitable[None]]) -> None:
    """Run `body`, turning a missing run, an unavailable database or live feed into a
    close code."""
    try:
        await body()
    except NotFound as exc:
        await _close(websocket, CLOSE_NOT_FOUND, "not_found", str(exc))
    except (*RETRYABLE, _Unavailable) as exc:
        logger.warning("websocket %s closed: %s", websocket.url.path, exc)
        await _close(websocket, CLOSE_TRY_AGAIN_LATER, "unavailable", f"try again later: {exc}")
    except WebSocketDisconnect:
        pass


# --- /ws/runs/{runId} -----------------------------------------------------------------------


async def _send_snapshot(stream: _Stream, store: Store, hub: EventHub, run_id: str) -> None:
    """Send a snapshot of the run and position the stream right after it.

    The subscription is restarted before the snapshot is read, so every event committed
    after that instant is queued; once the frontier has passed the snapshot's newest id,
    queued events the snapshot already shows are dropped. If one with a smaller id was not
    in it (it committed between the two), the snapshot is taken again.
    """
    for attempt in range(1, SNAPSHOT_TRIES + 1):
        start = stream.sub.restart()
        snap = await store.run_snapshot(run_id)
        target = max(start, snap.max_event_id)
        if not await hub.wait_frontier(target, SNAPSHOT_WAIT_S):
            raise _Unavailable(f"live events did not reach id {target} in time")
        if stream.sub.overflowed:
            continue
        queued = stream.sub.take(len(stream.sub))
        missed = {e.id for e in queued if e.id <= target and e.id not in snap.event_ids}
        if missed and attempt < SNAPSHOT_TRIES:
            logger.debug("run %s: event committed during its snapshot; reading again", run_id)
            continue
        await stream.send({"type": "snapshot", "run": snap.run, "lastEventId": target})
        stream.floor = target
        if missed:  # out of tries: still send them, after the snapshot
            logger.warning(
                "run %s: snapshot kept changing; %d event(s) follow it", run_id, len(missed)
            )
        after = [e for e in queued if e.id > target or e.id in missed]
        await stream.send_events(after, replay=True)
        return
    raise _Unavailable("the run changed too fast to snapshot")


async def _send_run_replay(
    stream: _Stream, store: Store, hub: EventHub, run_id: str, after: int
) -> None:
    start = stream.sub.restart()
    rows = await store.replay_events(run_id, after=after, upto=start, limit=REPLAY_MAX_EVENTS + 1)
    if len(rows) > REPLAY_MAX_EVENTS:
        metrics.WEBSOCKET_RESYNCS.labels(reason="replay_too_long").inc()
        await stream.send({"type": "resync", "reason": "replay_too_long"})
        await _send_snapshot(stream, store, hub, run_id)
        return
    await stream.send_events([LiveEvent.from_row(r) for r in rows], replay=True)
    stream.floor = max(after, start)


async def run_events(websocket: WebSocket) -> None:
    """``WS /ws/runs/{runId}``: a snapshot (or a replay after ``?after=``), then the run's
    events live. See the module docstring for the messages and close codes."""
    opened = await _open(websocket)
    if opened is None:
        return
    hub, store, after, batch = opened
    raw = websocket.path_params["run_id"]
    try:
        run_id = str(uuid.UUID(raw))
    except ValueError:
        await _close(websocket, CLOSE_NOT_FOUND, "not_found", f"no run {raw}")
        return
    sub = hub.subscribe(run_id)
    metrics.WEBSOCKET_CLIENTS.inc()
    stream = _Stream(websocket, sub, batch=batch)

    async def resync() -> None:
        metrics.WEBSOCKET_RESYNCS.labels(reason="slow_client").inc()
        await stream.send({"type": "resync", "reason": "slow_client"})
        await _send_snapshot(stream, store, hub, run_id)

    async def body() -> None:
        if after is None:
            await _send_snapshot(stream, store, hub, run_id)
        else:
            await _send_run_replay(stream, store, hub, run_id, after)
        await _serve(stream, resync)

    try:
        await _guarded(websocket, body)
    finally:
        hub.unsubscribe(sub)
        metrics.WEBSOCKET_CLIENTS.dec()


# --- /ws ------------------------------------------------------------------------------------


async def all_events(websocket: WebSocket) -> None:
    """``WS /ws``: a hello, the replay asked for with ``?after=``, then every event live.
    See the module docstring for the messages and close codes."""
    opened = await _open(websocket)
    if opened is None:
        return
    hub, store, after, batch = opened
    sub = hub.subscribe(None)
    metrics.WEBSOCKET_CLIENTS.inc()
    stream = _Stream(websocket, sub, batch=batch)

    async def resync(reason: str = "slow_client") -> None:
        metrics.WEBSOCKET_RESYNCS.labels(reason=reason).inc()
        start = sub.restart()
        stream.floor = start
        await stream.send({"type": "resync", "reason": reason, "lastEventId": start})

    async def body() -> None:
        start = sub.restart()
        stream.floor = start
        await stream.send({"type": "hello", "lastEventId": start})
        if after is not None and after < start:
            rows = await store.replay_events(
                None, after=after, upto=start, limit=REPLAY_MAX_EVENTS + 1
            )
            if len(rows) > REPLAY_MAX_EVENTS:
                await resync("replay_too_long")
            else:
                await stream.send_events([LiveEvent.from_row(r) for r in rows], replay=True)
        elif after is not None:
            stream.floor = after  # a client ahead of this process's frontier
        await _serve(stream, resync)

    try:
        await _guarded(websocket, body)
    finally:
        hub.unsubscribe(sub)
        metrics.WEBSOCKET_CLIENTS.dec()
