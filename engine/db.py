"""Connections: which Postgres to use, connection pools, and retrying through outages.

With `DATABASE_URL` set, that server is used as it is (run `python -m engine migrate`).
Without it, the embedded cluster under `PGDAG_HOME` is started if needed and migrated on
first use, under the cluster's file lock, so two processes starting together do not race.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TypeVar

import psycopg
from psycopg.rows import DictRow, dict_row
from psycopg_pool import AsyncConnectionPool

from engine.config import Settings

logger = logging.getLogger(__name__)

T = TypeVar("T")

POOL_TIMEOUT_S_DEFAULT = 30.0  # how long a caller waits for a pooled connection
CONNECT_TIMEOUT_S = 5  # libpq connect_timeout of the pool's connections (whole seconds)

# Errors after which the same operation may succeed on a fresh connection: the server went
# away or restarted (OperationalError), or the transaction lost a race (SQLSTATE 40001
# serialization_failure, 40P01 deadlock_detected).
RETRYABLE = (
    psycopg.OperationalError,
    psycopg.errors.SerializationFailure,
    psycopg.errors.DeadlockDetected,
)


def resolve_database_url(settings: Settings) -> str:
    """The URL every process uses: `settings.database_url`, else the embedded cluster's
    (started and migrated here if needed). Raises `EmbeddedPostgresError` when the embedded
    cluster cannot be started."""
    if settings.database_url:
        return settings.database_url
    from engine.embedded import EmbeddedCluster
    from engine.migrate import upgrade_head

    cluster = EmbeddedCluster.from_settings(settings)
    with cluster.lock():
        url = cluster.start()
        upgrade_head(url)
    return url


@dataclass
class Backoff:
    """Capped exponential backoff with jitter for reconnect loops: `next_delay` returns a
    pause (seconds) drawn from [d/2, d], where d starts at `first_s` and doubles after every
    call up to `max_s` ("equal jitter"); `reset` after a success starts again from `first_s`.
    """

    first_s: float
    max_s: float
    _next_s: float = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._next_s = self.first_s

    def next_delay(self) -> float:
        """The pause before the next try, in seconds; the one after will be longer."""
        delay = self._next_s * (0.5 + random.random() / 2)
        self._next_s = min(self.max_s, self._next_s * 2)
        return delay

    def reset(self) -> None:
        """Start again from `first_s` (call it once a connection proved healthy)."""
        self._next_s = self.first_s


async def open_pool(
    url: str,
    *,
    min_size: int = 1,
    max_size: int = 4,
    name: str = "pgdag",
    timeout_s: float = POOL_TIMEOUT_S_DEFAULT,
) -> AsyncConnectionPool[psycopg.AsyncConnection[DictRow]]:
    """Open an async pool of dict-row connections to `url` and wait until one is ready.

    `timeout_s` is how long `pool.connection()` waits for a connection by default before
    it raises `psycopg_pool.PoolTimeout` (an `OperationalError`): during an outage, the
    bound on how long a caller hangs. Each connection attempt gives up after
    `CONNECT_TIMEOUT_S`. Raises `PoolTimeout` when no connection can be made within 30 s.
    """
    pool: AsyncConnectionPool[psycopg.AsyncConnection[DictRow]] = AsyncConnectionPool(
        url,
        min_size=min_size,
        max_size=max_size,
        name=name,
        open=False,
        kwargs={
            "row_factory": dict_row,
            "autocommit": True,
            "connect_timeout": CONNECT_TIMEOUT_S,
        },
        timeout=timeout_s,
        connection_class=psycopg.AsyncConnection[DictRow],
        # Keep reconnecting (with the pool's own backoff) through a Postgres restart or an
        # outage of up to an hour; 0 would give up at the first failure and shrink the pool.
        reconnect_timeout=3600,
    )
    await pool.open(wait=True, timeout=30)
    return pool


async def retrying(
    op: Callable[[], Awaitable[T]],
    *,
    what: str,
    deadline_s: float | None = None,
    first_delay_s: float = 0.05,
    max_delay_s: float = 2.0,
) -> T:
    """Run `op` until it does not raise a retryable database error (see `RETRYABLE`).

    Waits with capped exponential backoff and jitter between tries; gives up and re-raises
    after `deadline_s` seconds (None: never). Other errors propagate at once.
    """
    loop = asyncio.get_running_loop()
    started = loop.time()
    delay = first_delay_s
    while True:
        try:
            return await op()
        except RETRYABLE as exc:
            if deadline_s is not None and loop.time() - started > deadline_s:
                raise
            logger.warning("%s failed (%s); retrying in %.2fs", what, type(exc).__name__, delay)
            await asyncio.sleep(delay * (0.5 + random.random() / 2))
            delay = min(max_delay_s, delay * 2)
