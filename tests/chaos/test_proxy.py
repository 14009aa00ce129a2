"""The fault-injecting TCP proxy (chaos/proxy.py) against the real test Postgres."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest

from chaos.faults import delay_database
from chaos.proxy import TcpProxy, proxied_url
from tests.support import wait_for

# How long a query on a stalled connection must stay blocked for the test to believe it is.
BLOCKED_CHECK_S = 0.5
CONNECT_TIMEOUT_S = 5


def target(db_url: str) -> tuple[str, int]:
    """The (host, port) of the server `db_url` names."""
    info = psycopg.conninfo.conninfo_to_dict(db_url)
    return str(info.get("host") or "127.0.0.1"), int(info.get("port") or 5432)


@pytest.fixture
def proxy(db_url: str) -> Iterator[TcpProxy]:
    p = TcpProxy(*target(db_url))
    p.start()
    try:
        yield p
    finally:
        p.stop()


@pytest.fixture
def url(db_url: str, proxy: TcpProxy) -> str:
    return proxied_url(db_url, proxy.port)


def connect(url: str, **kwargs: Any) -> psycopg.Connection[Any]:
    kwargs.setdefault("connect_timeout", CONNECT_TIMEOUT_S)
    return psycopg.connect(url, autocommit=True, **kwargs)


def one(conn: psycopg.Connection[Any], sql: str = "SELECT 1") -> Any:
    row = conn.execute(sql).fetchone()  # type: ignore[call-overload]
    assert row is not None
    return row[0]


# --- proxied_url (no database) ------------------------------------------------------------


def test_proxied_url_keeps_credentials_database_and_options() -> None:
    got = proxied_url("postgresql://u:p%40ss@db.example:6543/app?sslmode=disable&port=1", 7000)
    assert got == "postgresql://u:p%40ss@127.0.0.1:7000/app?sslmode=disable"


def test_proxied_url_replaces_multiple_hosts_and_host_parameters() -> None:
    got = proxied_url("postgres://h1:5432,h2:5433/db?host=/tmp&application_name=x", 1234)
    assert got == "postgres://127.0.0.1:1234/db?application_name=x"


def test_proxied_url_of_a_conninfo_string() -> None:
    got = proxied_url("host=/run/pg hostaddr=10.0.0.1 port=5432 dbname=app user=u", 99)
    assert psycopg.conninfo.conninfo_to_dict(got) == {
        "host": "127.0.0.1",
        "port": "99",
        "dbname": "app",
        "user": "u",
    }


# --- the proxy ----------------------------------------------------------------------------


def test_queries_pass_through(proxy: TcpProxy, url: str) -> None:
    with connect(url) as conn:
        assert one(conn) == 1
        assert one(conn, "SELECT current_database()") == conn.info.dbname
        # several chunks each way
        big = "x" * 1_000_000
        assert one(conn, f"SELECT length('{big}' || repeat('y', 3000000))") == 4_000_000
    assert proxy.accepted == 1
    assert proxy.dropped == 0
    wait_for(lambda: proxy.active == 0, timeout_s=5, what="the closed connection to end")


def test_drop_all_breaks_open_connections_and_new_ones_work(proxy: TcpProxy, url: str) -> None:
    with connect(url) as a, connect(url) as b:
        assert one(a) == 1 and one(b) == 1
        assert proxy.drop_all() == 2
        for conn in (a, b):
            with pytest.raises(psycopg.OperationalError):
                one(conn)
    assert proxy.dropped == 2
    wait_for(lambda: proxy.active == 0, timeout_s=5, what="dropped connections to be gone")
    with connect(url) as conn:
        assert one(conn) == 1
    assert proxy.accepted == 3


def test_stall_makes_a_connect_time_out(proxy: TcpProxy, url: str) -> None:
    proxy.stall(True)
    started = time.monotonic()
    with pytest.raises(psycopg.OperationalError):
        # libpq treats connect_timeout < 2 as 2 s
        connect(url, connect_timeout=1).close()
    assert time.monotonic() - started < CONNECT_TIMEOUT_S + 5
    assert proxy.accepted >= 1  # accepted, then silence
    proxy.stall(False)
    with connect(url) as conn:
        assert one(conn) == 1


def test_stall_blocks_a_query_until_unstalled(proxy: TcpProxy, url: str) -> None:
    with connect(url) as conn:
        assert one(conn) == 1
        result: list[Any] = []
        errors: list[BaseException] = []

        def query() -> None:
            try:
                result.append(one(conn, "SELECT 42"))
            except BaseException as exc:
                errors.append(exc)

        proxy.stall(True)
        thread = threading.Thread(target=query, daemon=True)
        try:
            thread.start()
            thread.join(timeout=BLOCKED_CHECK_S)
            assert thread.is_alive() and not result and not errors, (result, errors)
        finally:
            proxy.stall(False)
        thread.join(timeout=10)
        assert not thread.is_alive(), "the query did not resume after unstall"
        assert result == [42], errors
        assert one(conn) == 1


def test_drop_all_during_a_stall_ends_the_connections(proxy: TcpProxy, url: str) -> None:
    with connect(url) as conn:
        assert one(conn) == 1
        proxy.stall(True)
        assert proxy.drop_all() == 1
        wait_for(lambda: proxy.active == 0, timeout_s=5, what="the dropped connection to end")
        proxy.stall(False)
        with pytest.raises(psycopg.OperationalError):
            one(conn)


def test_refuse_closes_new_connections_only(proxy: TcpProxy, url: str) -> None:
    with connect(url) as existing:
        proxy.refuse(True)
        with pytest.raises(psycopg.OperationalError):
            connect(url).close()
        assert proxy.refused >= 1
        assert one(existing) == 1  # open connections are untouched
        proxy.refuse(False)
        with connect(url) as conn:
            assert one(conn) == 1


def test_latency_delays_each_round_trip(proxy: TcpProxy, url: str) -> None:
    latency_ms = 150
    with connect(url) as conn:
        assert one(conn) == 1
        delay_database(proxy, latency_ms)
        assert proxy.latency_ms == latency_ms
        started = time.monotonic()
        assert one(conn) == 1
        took_s = time.monotonic() - started
        assert took_s >= latency_ms / 1000, took_s
        delay_database(proxy, 0)
        assert one(conn) == 1


def test_stop_closes_connections_and_a_new_proxy_works(db_url: str) -> None:
    p = TcpProxy(*target(db_url))
    port = p.start()
    try:
        with pytest.raises(RuntimeError):
            p.start()
        with connect(proxied_url(db_url, port)) as conn:
            assert one(conn) == 1
            p.stop()
            with pytest.raises(psycopg.OperationalError):
                one(conn)
        with pytest.raises(RuntimeError):
            p.drop_all()
    finally:
        p.stop()
    with TcpProxy(*target(db_url)) as again, connect(proxied_url(db_url, again.port)) as conn:
        assert one(conn) == 1
