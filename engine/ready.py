"""`ReadySignal`: one ``LISTEN pgdag_ready`` connection per API process, for long-polls.

An agent's ``POST /agent/claim`` that finds nothing ready waits here instead of polling
Postgres: every waiter of the process shares this one connection (not one per request).
The connection is reconnected after any failure with capped exponential backoff and jitter;
while it is down (and always, since a NOTIFY sent while nobody listened is lost), waiters
also re-poll at least every `poll_interval_s`: a wake-up is only a hint to claim again.

Usage, without a lost wake-up between the claim and the wait::

    seen = ready.generation()          # before the claim
    steps = claim()
    if not steps:
        await ready.wait(seen, timeout_s)  # returns at once if a NOTIFY came meanwhile
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable

import psycopg

from engine.db import CONNECT_TIMEOUT_S, Backoff

logger = logging.getLogger(__name__)

READY_CHANNEL = "pgdag_ready"  # sent by the audit trigger when a step became ready
RECONNECT_FIRST_S = 0.5  # first pause after the LISTEN connection fails; doubles
RECONNECT_MAX_S = 5.0  # up to this


class ReadySignal:
    """Wakes long-polls when Postgres says a step became ready (``NOTIFY pgdag_ready``).

    `start()` opens the listener task, `stop()` ends it. `generation()` counts the
    notifications seen (and the reconnects, after which anything may have been missed).
    """

    def __init__(self, database_url: str) -> None:
        self.database_url = database_url
        self._generation = 0
        self._changed = asyncio.Condition()
        self._task: asyncio.Task[None] | None = None
        self.connected = False  # LISTEN is in place now
        self.connections = 0  # how many times LISTEN was put in place (1 + reconnects)

    def generation(self) -> int:
        """The number of wake-ups so far; pass it to `wait`."""
        return self._generation

    async def start(self) -> None:
        """Start listening (in the background; the first connection may still be coming)."""
        if self._task is None:
            self._task = asyncio.create_task(self._listen_loop(), name="ready-listener")

    async def stop(self) -> None:
        """Stop listening and close the connection; waiters wake up (they re-poll)."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        await self._bump()

    async def wait(self, seen: int, timeout_s: float) -> bool:
        """Wait until a wake-up newer than `seen` (a `generation()` value), at most
        `timeout_s` seconds. Returns True when woken, False on timeout."""
        if timeout_s <= 0:
            return self._generation != seen
        async with self._changed:
            try:
                await asyncio.wait_for(
                    self._changed.wait_for(lambda: self._generation != seen), timeout_s
                )
            except TimeoutError:
                return False
        return True

    async def _bump(self) -> None:
        async with self._changed:
            self._generation += 1
            self._changed.notify_all()

    async def _listen_loop(self) -> None:
        await listen_for_ready(
            self.database_url,
            self._bump,
            label="ready listener",
            meanwhile="agents' claims poll meanwhile",
            on_state=self._on_state,
        )

    def _on_state(self, connected: bool) -> None:
        self.connected = connected
        if connected:
            self.connections += 1


async def listen_for_ready(
    database_url: str,
    on_notify: Callable[[], Awaitable[None]],
    *,
    label: str,
    meanwhile: str,
    on_state: Callable[[bool], None] | None = None,
) -> None:
    """``LISTEN pgdag_ready`` on a connection of its own until cancelled: `on_notify` is
    awaited after each (re)connect (to catch up on anything sent while nobody listened) and
    on each notification. After any failure it reconnects with capped exponential backoff
    and jitter (`RECONNECT_FIRST_S` .. `RECONNECT_MAX_S`, reset once LISTEN works again),
    logging the first failure of an outage and its end as `label`, not each try
    (`meanwhile` says what keeps work moving in between). `on_state` hears True once
    listening and False when the connection is lost. The one LISTEN loop of both the API's
    `ReadySignal` and a database worker."""
    backoff = Backoff(RECONNECT_FIRST_S, RECONNECT_MAX_S)
    failures = 0
    down_since = 0.0
    state = on_state or (lambda _connected: None)
    while True:
        try:
            conn = await psycopg.AsyncConnection.connect(
                database_url, autocommit=True, connect_timeout=CONNECT_TIMEOUT_S
            )
            async with conn:
                await conn.execute(f"LISTEN {READY_CHANNEL}")
                if failures:
                    logger.info(
                        "%s back after %.1fs and %d failed attempt(s)",
                        label,
                        time.monotonic() - down_since,
                        failures,
                    )
                failures = 0
                backoff.reset()
                await on_notify()
                state(True)
                async for _ in conn.notifies():
                    await on_notify()
        except asyncio.CancelledError:
            state(False)
            raise
        except Exception as exc:
            state(False)
            failures += 1
            if failures == 1:
                down_since = time.monotonic()
                logger.warning(
                    "%s lost (%s); reconnecting with backoff (up to %.0fs between tries), %s",
                    label,
                    str(exc).strip().splitlines()[0] if str(exc).strip() else exc,
                    RECONNECT_MAX_S,
                    meanwhile,
                )
            else:
                logger.debug("%s still down (attempt %d): %s", label, failures, exc)
        state(False)
        await asyncio.sleep(backoff.next_delay())
