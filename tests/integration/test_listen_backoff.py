"""LISTEN reconnects back off (exponential with jitter, capped, reset on success) and log
only when their state changes: the API's `EventHub` on a database without the schema (it
connects, then every read fails), and the worker's listen loop against a server that
closes every connection. Attempts are counted by a real TCP proxy in front of Postgres."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator
from urllib.parse import urlsplit, urlunsplit

import pytest

from chaos.proxy import TcpProxy
from engine.config import Settings
from engine.db import open_pool
from engine.live import EventHub
from engine.migrate import upgrade_head
from engine.store import Store
from tests.pgfixtures import Database, create_database, drop_database, unique_name
from tests.support import wait_for
from workers.database import DatabaseBackend

# With the first pause 0.5 s (jittered to >= 0.25 s) doubling to 1, 2, 4 s, the 5th attempt
# comes >= 3.75 s after the first; a loop without backoff makes 5 in well under a second.
ATTEMPTS = 5
MIN_SPAN_S = 3.5


def _via(url: str, proxy: TcpProxy) -> str:
    """`url` through the proxy, without TLS (so each attempt is one TCP connection)."""
    parts = urlsplit(url)
    netloc = parts.netloc.rsplit("@", 1)
    host = f"127.0.0.1:{proxy.port}"
    netloc_new = f"{netloc[0]}@{host}" if len(netloc) == 2 else host
    return urlunsplit(parts._replace(netloc=netloc_new, query="sslmode=disable"))


@pytest.fixture
def proxy(pg_server_url: str) -> Iterator[TcpProxy]:
    parts = urlsplit(pg_server_url)
    assert parts.hostname is not None and parts.port is not None
    with TcpProxy(parts.hostname, parts.port) as p:
        yield p


@pytest.fixture
def empty_db(pg_server_url: str) -> Iterator[Database]:
    db = create_database(pg_server_url, unique_name("unmigrated_"))
    try:
        yield db
    finally:
        drop_database(pg_server_url, db.name)


def _lines(caplog: pytest.LogCaptureFixture, logger: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == logger and r.levelno >= 20]


def test_event_hub_backs_off_on_an_unmigrated_database(
    empty_db: Database, proxy: TcpProxy, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)

    async def go() -> float:
        hub = EventHub(_via(empty_db.url, proxy))
        loop = asyncio.get_running_loop()
        await hub.start()
        try:
            await asyncio.to_thread(
                wait_for, lambda: proxy.accepted >= 1, timeout_s=10, what="first attempt"
            )
            first = loop.time()
            await asyncio.to_thread(
                wait_for,
                lambda: proxy.accepted >= ATTEMPTS,
                timeout_s=30,
                what=f"{ATTEMPTS} attempts",
            )
            span = loop.time() - first
            # Success resets it: migrate, and the hub becomes ready without a restart.
            await asyncio.to_thread(upgrade_head, empty_db.url)
            await asyncio.wait_for(hub.ready.wait(), 20)
            return span
        finally:
            await hub.stop()

    span = asyncio.run(go())
    assert span >= MIN_SPAN_S, f"{ATTEMPTS} attempts in {span:.2f}s: no backoff"
    lines = _lines(caplog, "engine.live")
    assert len(lines) <= 2, lines  # lost once, back once


def test_worker_listen_loop_backs_off_and_logs_once(
    db_url: str, proxy: TcpProxy, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    proxy.refuse(True)  # every connection is closed as soon as it is accepted

    async def go() -> float:
        pool = await open_pool(db_url, min_size=1, max_size=2)
        backend = DatabaseBackend(
            Store(pool, lease_ttl_s=30), Settings(), database_url=_via(db_url, proxy), worker_id="w"
        )
        loop = asyncio.get_running_loop()
        task = asyncio.create_task(backend.listen_loop(lambda: None))
        try:
            await asyncio.to_thread(
                wait_for, lambda: proxy.accepted >= 1, timeout_s=10, what="first attempt"
            )
            first = loop.time()
            await asyncio.to_thread(
                wait_for,
                lambda: proxy.accepted >= ATTEMPTS,
                timeout_s=30,
                what=f"{ATTEMPTS} attempts",
            )
            span = loop.time() - first
            proxy.refuse(False)
            await asyncio.to_thread(
                wait_for, lambda: proxy.active >= 1, timeout_s=20, what="listener back"
            )
            return span
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            await pool.close()

    span = asyncio.run(go())
    assert span >= MIN_SPAN_S, f"{ATTEMPTS} attempts in {span:.2f}s: no backoff"
    lines = _lines(caplog, "workers.worker")
    assert len(lines) <= 2, lines  # lost once, back once
