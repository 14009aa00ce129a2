"""`engine.ready.ReadySignal`, the API's one shared ``LISTEN pgdag_ready``: a NOTIFY wakes a
waiter, a wake-up that came between `generation()` and `wait` is not lost, and the listener
comes back after its connection is killed (real Postgres, no mocks)."""

from __future__ import annotations

import asyncio
import time

import psycopg

from engine.ready import ReadySignal


async def _until(condition: object, what: str, timeout_s: float = 15) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():  # type: ignore[operator]
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.02)


async def _notify(db_url: str) -> None:
    async with await psycopg.AsyncConnection.connect(db_url, autocommit=True) as conn:
        await conn.execute("NOTIFY pgdag_ready")


async def _scenario(db_url: str) -> None:
    signal = ReadySignal(db_url)
    await signal.start()
    try:
        await _until(lambda: signal.connected, "the listener to connect")
        seen = signal.generation()
        assert await signal.wait(seen, 0.05) is False  # nothing sent: a timeout
        started = time.monotonic()
        waiter = asyncio.create_task(signal.wait(seen, 30))
        await _notify(db_url)
        assert await waiter is True
        assert time.monotonic() - started < 5

        # A wake-up between generation() and wait() is not lost: wait returns at once.
        seen = signal.generation()
        await _notify(db_url)
        await _until(lambda: signal.generation() != seen, "the NOTIFY to arrive")
        assert await signal.wait(seen, 30) is True

        # Kill the LISTEN connection: it reconnects (with backoff) and wakes waiters then.
        async with await psycopg.AsyncConnection.connect(db_url, autocommit=True) as admin:
            cur = await admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE datname = current_database() AND query LIKE 'LISTEN pgdag_ready%%'"
            )
            assert (await cur.fetchall()) != []
        await _until(lambda: signal.connections == 2, "the listener to reconnect")
        seen = signal.generation()
        waiter = asyncio.create_task(signal.wait(seen, 30))
        await _notify(db_url)
        assert await waiter is True
    finally:
        await signal.stop()
    assert signal.connected is False


def test_ready_signal_wakes_waiters_and_reconnects(db_url: str) -> None:
    asyncio.run(_scenario(db_url))
