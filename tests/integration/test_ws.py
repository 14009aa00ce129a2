"""The WebSocket endpoints against a real Postgres, real `engine serve` processes and real
workers: snapshot then events, exact resumption with ``after``, a late-committing lower id,
slow clients, API and Postgres restarts, and auth."""

from __future__ import annotations

import base64
import contextlib
import json
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import httpx
import psycopg
import pytest
from psycopg.rows import dict_row
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import ClientConnection, connect

import tests.testtools  # noqa: F401  (registers the TEST_ tools for `submit` here)
from engine.embedded import EmbeddedCluster
from engine.migrate import upgrade_head
from engine.sql import queries
from tests.pgfixtures import server_home
from tests.support import (
    Proc,
    api_server,
    base_env,
    free_port,
    query,
    random_delay_dag,
    submit,
    wait_for,
    wait_run_finished,
    workers,
)

TERMINAL_RUN_EVENTS = {"run_completed", "run_failed", "run_cancelled"}


# --- helpers ------------------------------------------------------------------------------


def ws_url(base: str, path: str, **params: Any) -> str:
    query_string = "?" + urlencode(params) if params else ""
    return "ws://" + base.removeprefix("http://") + path + query_string


def ws_connect(
    base: str, path: str, *, headers: dict[str, str] | None = None, **params: Any
) -> ClientConnection:
    return connect(
        ws_url(base, path, **params),
        additional_headers=headers,
        proxy=None,
        max_size=None,
        max_queue=None,
        compression=None,
    )


def recv(ws: ClientConnection, timeout_s: float = 30) -> dict[str, Any]:
    message: dict[str, Any] = json.loads(ws.recv(timeout=timeout_s))
    return message


def events_until_run_ends(
    ws: ClientConnection, run_id: str | None = None, timeout_s: float = 90
) -> list[dict[str, Any]]:
    """Event objects until `run_id`'s (or any run's) terminal event, inclusive."""
    deadline = time.monotonic() + timeout_s
    got: list[dict[str, Any]] = []
    while True:
        message = recv(ws, max(0.1, deadline - time.monotonic()))
        assert message["type"] == "event", message
        got.append(message["event"])
        e = message["event"]
        if e["event"] in TERMINAL_RUN_EVENTS and (run_id is None or e["runId"] == run_id):
            return got


def db_event_ids(db_url: str, run_id: str | None = None, after: int = 0) -> list[int]:
    if run_id is None:
        rows = query(db_url, "SELECT id FROM audit_log WHERE id > %(a)s ORDER BY id", {"a": after})
    else:
        rows = query(
            db_url,
            "SELECT id FROM audit_log WHERE run_id = %(r)s AND id > %(a)s ORDER BY id",
            {"r": run_id, "a": after},
        )
    return [r["id"] for r in rows]


def assert_exact_stream(ids: list[int], expected: list[int]) -> None:
    """Strictly increasing (so no duplicate) and exactly the expected ids."""
    assert ids == sorted(set(ids)), f"not strictly increasing: {ids}"
    missing, extra = sorted(set(expected) - set(ids)), sorted(set(ids) - set(expected))
    assert ids == expected, (
        f"{len(missing)} missing (first {missing[:20]}), {len(extra)} extra (first {extra[:20]})"
    )


def state_from_events(run_id: str, db_url: str, upto: int) -> dict[str, str]:
    """Each step's status after the run's events with id <= upto (from the audit log)."""
    steps = query(db_url, "SELECT name, depends_on FROM steps WHERE run_id = %(r)s", {"r": run_id})
    status = {s["name"]: ("pending" if s["depends_on"] else "ready") for s in steps}
    rows = query(
        db_url,
        "SELECT step_name, to_status FROM audit_log WHERE run_id = %(r)s AND id <= %(u)s"
        " AND step_name IS NOT NULL ORDER BY id",
        {"r": run_id, "u": upto},
    )
    for r in rows:
        status[r["step_name"]] = r["to_status"]
    return status


def post_run(base: str, body: dict[str, Any], **headers: str) -> str:
    r = httpx.post(f"{base}/runs", json=body, headers=headers, timeout=30)
    assert r.status_code == 201, r.text
    run_id: str = r.json()["id"]
    return run_id


def succeeded(db_url: str, run_id: str) -> int:
    return int(
        query(
            db_url,
            "SELECT count(*) AS n FROM steps WHERE run_id = %(r)s AND status = 'succeeded'",
            {"r": run_id},
        )[0]["n"]
    )


def gated_run(gate: Path, before: int = 5, after: int = 10) -> dict[str, Any]:
    """DELAY steps, then `gate` (fails, retried, until the file `gate` exists), then more."""
    steps: list[dict[str, Any]] = [
        {"name": f"pre{i}", "tool": "DELAY", "input": {"ms": 0}} for i in range(before)
    ]
    steps.append(
        {
            "name": "gate",
            "tool": "TEST_FAIL_UNTIL_FILE",
            "input": {"path": str(gate)},
            "dependsOn": [f"pre{i}" for i in range(before)],
            "maxAttempts": 100,
        }
    )
    steps += [
        {"name": f"post{i}", "tool": "DELAY", "input": {"ms": 0}, "dependsOn": ["gate"]}
        for i in range(after)
    ]
    return {"goal": "gated", "steps": steps}


def read_until(ws: ClientConnection, predicate: Any, timeout_s: float = 60) -> list[dict[str, Any]]:
    """Messages until one satisfies `predicate` (inclusive)."""
    deadline = time.monotonic() + timeout_s
    got = []
    while True:
        message = recv(ws, max(0.1, deadline - time.monotonic()))
        got.append(message)
        if predicate(message):
            return got


@contextlib.contextmanager
def api_process(db_url: str, log: Path, **env: str) -> Iterator[tuple[str, Proc]]:
    """`engine serve` on a free port, with its process (for its RSS and its log)."""
    port = free_port()
    proc = Proc(["-m", "engine", "serve", "--port", str(port)], base_env(db_url, **env), log)
    base = f"http://127.0.0.1:{port}"

    def healthy() -> bool:
        if proc.popen.poll() is not None:
            raise AssertionError("API exited:\n" + proc.output())
        try:
            return httpx.get(f"{base}/health", timeout=1).status_code == 200
        except httpx.TransportError:
            return False

    try:
        wait_for(healthy, what="API health")
        yield base, proc
    finally:
        proc.stop()


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


# --- snapshot and order -------------------------------------------------------------------


def test_run_snapshot_then_every_event_in_order(db_url: str, tmp_path: Path) -> None:
    with api_server(db_url, tmp_path) as base:
        run_id = post_run(base, random_delay_dag(40, 10, 60, seed=3, dep_share=0.6))
        clients = []
        with workers(db_url, tmp_path, n=2, concurrency=4):
            # Three clients joining at different moments of the run, one before it starts.
            for progress in (0, 8, 20):
                wait_for(lambda p=progress: succeeded(db_url, run_id) >= p, what="progress")
                clients.append(ws_connect(base, f"/ws/runs/{run_id}"))
            assert wait_run_finished(db_url, run_id) == "completed"
            for ws in clients:
                with ws:
                    snap = recv(ws)
                    assert snap["type"] == "snapshot"
                    n = snap["lastEventId"]
                    shown = {s["name"]: s["status"] for s in snap["run"]["steps"]}
                    # The snapshot is exactly the run after its events with id <= N.
                    assert shown == state_from_events(run_id, db_url, n)
                    got = events_until_run_ends(ws, run_id)
                    assert_exact_stream([e["id"] for e in got], db_event_ids(db_url, run_id, n))
                    for e in got:
                        if e["stepName"]:
                            shown[e["stepName"]] = e["toStatus"]
                    assert set(shown.values()) == {"succeeded"}
        # Each event is exactly the shape of GET /runs/{id}/events.
        http_events = httpx.get(f"{base}/runs/{run_id}/events", params={"limit": 10_000}).json()
        by_id = {e["id"]: e for e in http_events["events"]}
        assert all(by_id[e["id"]] == e for e in got)


def test_all_runs_stream_hello_then_every_event(db_url: str, tmp_path: Path) -> None:
    with api_server(db_url, tmp_path) as base, ws_connect(base, "/ws") as ws:
        hello = recv(ws)
        assert hello["type"] == "hello"
        n = hello["lastEventId"]
        runs = [post_run(base, random_delay_dag(15, 0, 30, seed=s)) for s in (1, 2)]
        with workers(db_url, tmp_path, n=2, concurrency=4):
            for run_id in runs:
                assert wait_run_finished(db_url, run_id) == "completed"
        got: list[dict[str, Any]] = []
        while len([e for e in got if e["event"] in TERMINAL_RUN_EVENTS]) < 2:
            got += events_until_run_ends(ws)
        assert_exact_stream([e["id"] for e in got], db_event_ids(db_url, None, n))
        assert {e["runId"] for e in got} == set(runs)


def test_batch_mode_sends_the_same_events_in_fewer_frames(db_url: str, tmp_path: Path) -> None:
    with api_server(db_url, tmp_path) as base, ws_connect(base, "/ws", batch=1) as ws:
        n = recv(ws)["lastEventId"]
        run_id = post_run(base, random_delay_dag(30, 0, 0, seed=4))
        with workers(db_url, tmp_path, n=1, concurrency=8):
            assert wait_run_finished(db_url, run_id) == "completed"
        frames = read_until(
            ws, lambda m: any(e["event"] == "run_completed" for e in m.get("events", []))
        )
        assert {m["type"] for m in frames} == {"events"}
        ids = [e["id"] for m in frames for e in m["events"]]
        assert_exact_stream(ids, db_event_ids(db_url, None, n))
        assert len(frames) < len(ids)


# --- the late commit ----------------------------------------------------------------------


def claim_one(conn: psycopg.Connection[Any], worker_id: str) -> list[int]:
    """Run the real claim statement on `conn` (in its open transaction, if any); returns
    the audit ids it wrote, read inside that transaction."""
    conn.execute(
        queries["claim_steps"],
        {"worker_id": worker_id, "limit": 1, "lease_ttl_s": 30, "tools": ["DELAY"]},
    )
    rows = conn.execute(
        "SELECT id FROM audit_log WHERE worker_id = %s ORDER BY id", (worker_id,)
    ).fetchall()
    return [r["id"] for r in rows]


def test_a_lower_id_that_commits_later_is_delivered_first(db_url: str, tmp_path: Path) -> None:
    run_id = submit(
        db_url,
        {"steps": [{"name": f"s{i}", "tool": "DELAY", "input": {"ms": 0}} for i in range(5)]},
    )
    with (
        api_server(db_url, tmp_path, PGDAG_LIVE_STALL="60") as base,
        ws_connect(base, "/ws") as ws_all,
        ws_connect(base, f"/ws/runs/{run_id}") as ws_run,
        psycopg.connect(db_url, autocommit=True, row_factory=dict_row) as auto,
        psycopg.connect(db_url, row_factory=dict_row) as conn_a,
        psycopg.connect(db_url, row_factory=dict_row) as conn_c,
    ):
        recv(ws_all), recv(ws_run)
        first = claim_one(auto, "w0")  # run_started + step_claimed, committed
        assert [recv(ws_run)["event"]["id"] for _ in first] == first
        assert [recv(ws_all)["event"]["id"] for _ in first] == first

        # A takes the lower id and stays open; B takes a higher one and commits. (The run is
        # running already, so they share no row lock.)
        ids_a = claim_one(conn_a, "A")
        ids_b = claim_one(auto, "B")
        assert max(ids_a) < min(ids_b)
        for ws in (ws_all, ws_run):
            with pytest.raises(TimeoutError):  # B is held back while A may still commit
                ws.recv(timeout=1.0)
        conn_a.commit()
        for ws in (ws_all, ws_run):
            assert [recv(ws)["event"]["id"] for _ in ids_a + ids_b] == ids_a + ids_b

        # C takes a lower id and rolls back; D commits: D goes out, C never.
        claim_one(conn_c, "C")
        ids_d = claim_one(auto, "D")
        conn_c.rollback()
        for ws in (ws_all, ws_run):
            assert [recv(ws)["event"]["id"] for _ in ids_d] == ids_d
            with pytest.raises(TimeoutError):
                ws.recv(timeout=0.5)

        # A client resuming after the first events gets A then B then D, nothing else.
        with ws_connect(base, f"/ws/runs/{run_id}", after=max(first)) as again:
            got = [recv(again)["event"]["id"] for _ in ids_a + ids_b + ids_d]
            assert got == ids_a + ids_b + ids_d


def test_a_transaction_left_open_holds_events_back_only_for_the_stall_time(
    db_url: str, tmp_path: Path
) -> None:
    submit(
        db_url,
        {"steps": [{"name": f"s{i}", "tool": "DELAY", "input": {"ms": 0}} for i in range(3)]},
    )
    with (
        api_process(db_url, tmp_path / "api.log", PGDAG_LIVE_STALL="1") as (base, api),
        ws_connect(base, "/ws") as ws,
        psycopg.connect(db_url, autocommit=True, row_factory=dict_row) as auto,
        psycopg.connect(db_url, row_factory=dict_row) as conn_a,
    ):
        recv(ws)
        first = claim_one(auto, "w0")  # the run is running: A and B share no row lock
        assert [recv(ws)["event"]["id"] for _ in first] == first
        ids_a = claim_one(conn_a, "A")
        ids_b = claim_one(auto, "B")
        assert max(ids_a) < min(ids_b)
        started = time.monotonic()
        # B arrives although A is still open, once A's ids are older than the stall time.
        assert [recv(ws, 10)["event"]["id"] for _ in ids_b] == ids_b
        assert time.monotonic() - started > 0.5
        conn_a.commit()
        assert [recv(ws, 10)["event"]["id"] for _ in ids_a] == ids_a  # late, but delivered
        wait_for(lambda: "delivered late" in api.output(), what="the late-delivery warning")


# --- resuming -------------------------------------------------------------------------------


def test_reconnect_with_after_loses_nothing(db_url: str, tmp_path: Path) -> None:
    with api_server(db_url, tmp_path) as base:
        run_id = post_run(base, random_delay_dag(60, 10, 40, seed=7, dep_share=0.7))
        with ws_connect(base, "/ws") as ws_all:
            n_all = recv(ws_all)["lastEventId"]
            with workers(db_url, tmp_path, n=2, concurrency=3):
                with ws_connect(base, f"/ws/runs/{run_id}") as ws:
                    n = recv(ws)["lastEventId"]
                    first = [recv(ws)["event"] for _ in range(15)]
                    first_all = [recv(ws_all)["event"] for _ in range(20)]
                    ws_all.close()
                last = first[-1]["id"]
                # More happens while nobody listens.
                wait_for(
                    lambda: len(db_event_ids(db_url, run_id, last)) >= 20,
                    what="events while disconnected",
                )
                with (
                    ws_connect(base, f"/ws/runs/{run_id}", after=last) as ws,
                    ws_connect(base, "/ws", after=first_all[-1]["id"]) as ws_all2,
                ):
                    rest = events_until_run_ends(ws, run_id)
                    hello = recv(ws_all2)
                    assert hello["type"] == "hello"
                    rest_all = events_until_run_ends(ws_all2, run_id)
        ids = [e["id"] for e in first + rest]
        assert_exact_stream(ids, db_event_ids(db_url, run_id, n))
        ids_all = [e["id"] for e in first_all + rest_all]
        assert_exact_stream(ids_all, db_event_ids(db_url, None, n_all))


def test_api_restart_then_resume_with_after(db_url: str, tmp_path: Path) -> None:
    gate = tmp_path / "gate"
    tools = {"PGDAG_TOOLS": "tests.testtools"}
    with workers(db_url, tmp_path, n=2, concurrency=4, **tools):
        (tmp_path / "a").mkdir()
        with api_server(db_url, tmp_path / "a", **tools) as base:
            run_id = post_run(base, gated_run(gate))
            with (
                ws_connect(base, f"/ws/runs/{run_id}") as ws,
                ws_connect(base, "/ws") as ws_all,
            ):
                n = recv(ws)["lastEventId"]
                n_all = recv(ws_all)["lastEventId"]
                first = read_until(ws, lambda m: m["event"]["event"] == "step_retry_scheduled")
                first_all = read_until(
                    ws_all, lambda m: m["event"]["event"] == "step_retry_scheduled"
                )
        with pytest.raises(ConnectionClosed):  # the API went away under the client
            while True:
                ws.recv(timeout=10)
        gate.touch()  # the run goes on, and finishes, while no API runs
        assert wait_run_finished(db_url, run_id) == "completed"
        (tmp_path / "b").mkdir()
        with (
            api_server(db_url, tmp_path / "b", **tools) as base,
            ws_connect(base, f"/ws/runs/{run_id}", after=first[-1]["event"]["id"]) as ws,
            ws_connect(base, "/ws", after=first_all[-1]["event"]["id"]) as ws_all,
        ):
            rest = events_until_run_ends(ws, run_id)
            assert recv(ws_all)["type"] == "hello"
            rest_all = events_until_run_ends(ws_all, run_id)
    ids = [m["event"]["id"] for m in first] + [e["id"] for e in rest]
    assert_exact_stream(ids, db_event_ids(db_url, run_id, n))
    ids_all = [m["event"]["id"] for m in first_all] + [e["id"] for e in rest_all]
    assert_exact_stream(ids_all, db_event_ids(db_url, None, n_all))


@pytest.fixture
def own_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedCluster]:
    """A cluster of this test's own, since the test restarts it."""
    cluster = EmbeddedCluster(server_home(tmp_path_factory, "ws-restart-pg"))
    yield cluster
    cluster.stop()


def test_postgres_restart_streams_resume_with_nothing_lost(
    own_cluster: EmbeddedCluster, tmp_path: Path
) -> None:
    url = own_cluster.start()
    upgrade_head(url)
    gate = tmp_path / "gate"
    tools = {"PGDAG_TOOLS": "tests.testtools"}
    with (
        api_process(url, tmp_path / "api.log", **tools) as (base, api),
        workers(url, tmp_path, n=2, concurrency=4, **tools),
    ):
        run_id = post_run(base, gated_run(gate))
        with ws_connect(base, f"/ws/runs/{run_id}") as ws, ws_connect(base, "/ws") as ws_all:
            n = recv(ws)["lastEventId"]
            n_all = recv(ws_all)["lastEventId"]
            first = read_until(ws, lambda m: m["event"]["event"] == "step_retry_scheduled")
            own_cluster.stop()
            gate.touch()
            own_cluster.start()
            wait_for(
                lambda: "event listener reconnected" in api.output(),
                timeout_s=60,
                what="the listener to reconnect",
            )
            assert wait_run_finished(url, run_id, timeout_s=90) == "completed"
            rest = events_until_run_ends(ws, run_id)
            got_all = events_until_run_ends(ws_all, run_id)
    ids = [m["event"]["id"] for m in first] + [e["id"] for e in rest]
    assert_exact_stream(ids, db_event_ids(url, run_id, n))
    assert_exact_stream([e["id"] for e in got_all], db_event_ids(url, None, n_all))


def test_listen_connection_killed_reconnects_and_loses_nothing(db_url: str, tmp_path: Path) -> None:
    with (
        api_process(db_url, tmp_path / "api.log") as (base, api),
        ws_connect(base, "/ws") as ws,
    ):
        n = recv(ws)["lastEventId"]
        run_id = post_run(base, random_delay_dag(30, 0, 20, seed=11))
        killed = query(
            db_url,
            "SELECT pg_terminate_backend(pid) AS ok FROM pg_stat_activity"
            " WHERE application_name = 'pgdag-api-listener' AND datname = current_database()",
        )
        assert [r["ok"] for r in killed] == [True]
        with workers(db_url, tmp_path, n=1, concurrency=4):
            got = events_until_run_ends(ws, run_id)
        wait_for(lambda: "event listener reconnected" in api.output(), what="the reconnection")
    assert_exact_stream([e["id"] for e in got], db_event_ids(db_url, None, n))


# --- slow clients -------------------------------------------------------------------------


def stalled_client(base: str, path: str) -> socket.socket:
    """A WebSocket client that reads nothing until `read_frames` is called."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", int(base.rsplit(":", 1)[1])))
    key = base64.b64encode(os.urandom(16)).decode()
    sock.sendall(
        f"GET {path} HTTP/1.1\r\nHost: {base.removeprefix('http://')}\r\n"
        "Upgrade: websocket\r\nConnection: Upgrade\r\n"
        f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n".encode()
    )
    return sock


def read_frames(sock: socket.socket, until: Any, timeout_s: float = 60) -> list[dict[str, Any]]:
    """Text messages from `sock` (after its handshake) until one satisfies `until`.
    Answers no pings: call it before the server's keepalive gives up (20 s + 20 s)."""
    sock.settimeout(timeout_s)
    buf = b""
    while b"\r\n\r\n" not in buf:
        buf += sock.recv(65536)
    head, _, buf = buf.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 101"), head
    messages: list[dict[str, Any]] = []
    while True:
        while True:  # parse what is buffered
            if len(buf) < 2:
                break
            size, at = buf[1] & 127, 2
            if size == 126:
                size, at = int.from_bytes(buf[2:4], "big"), 4
            elif size == 127:
                size, at = int.from_bytes(buf[2:10], "big"), 10
            if len(buf) < at + size:
                break
            opcode, payload, buf = buf[0] & 15, buf[at : at + size], buf[at + size :]
            if opcode == 1:
                messages.append(json.loads(payload))
                if until(messages[-1]):
                    return messages
            elif opcode == 8:
                raise AssertionError(f"closed by the server after {len(messages)} messages")
        data = sock.recv(1 << 20)
        if not data:
            raise AssertionError(f"connection ended after {len(messages)} messages")
        buf += data


def loud_failures(tmp_path: Path, n: int) -> dict[str, Any]:
    """`n` steps that fail 4 times each with a ~3 KB error (a long file path that does not
    exist), so a few thousand events fill the kernel's socket buffers (megabytes)."""
    long_path = tmp_path.joinpath(*(["x" * 200] * 15), "never")
    return {
        "steps": [
            {
                "name": f"f{i}",
                "tool": "TEST_FAIL_UNTIL_FILE",
                "input": {"path": str(long_path)},
                "maxAttempts": 4,
            }
            for i in range(n)
        ]
    }


def test_a_client_that_never_reads_does_not_stop_others_and_gets_resync(
    db_url: str, tmp_path: Path
) -> None:
    env = {"PGDAG_LIVE_QUEUE": "1200", "PGDAG_TOOLS": "tests.testtools"}
    with api_process(db_url, tmp_path / "api.log", **env) as (base, api):
        first_run = post_run(base, loud_failures(tmp_path, 300))
        slow = stalled_client(base, "/ws")
        slow_run = stalled_client(base, f"/ws/runs/{first_run}")
        with ws_connect(base, "/ws") as fast:
            n = recv(fast)["lastEventId"]
            with workers(db_url, tmp_path, n=2, concurrency=8, **env):
                # The fast client gets every event while the slow ones read nothing. The first
                # run overflows the slow clients' queues and the second fills the API's buffers
                # to their steady state; the API's memory is measured across the third.
                got = events_until_run_ends(fast, first_run)
                # Straight to the database: a 1 MB POST would raise the API's memory by itself.
                got += events_until_run_ends(fast, submit(db_url, loud_failures(tmp_path, 300)))
                rss_before = rss_kib(api.pid)
                last_run = submit(db_url, loud_failures(tmp_path, 300))
                more = events_until_run_ends(fast, last_run)
                grown_kib = rss_kib(api.pid) - rss_before
        everything = [e["id"] for e in got + more]
        final = everything[-1]
        assert_exact_stream(everything, db_event_ids(db_url, None, n))
        # A queue that kept the last run's events for the slow /ws client would hold more
        # than their JSON text (each also keeps its dict).
        held_kib = sum(len(json.dumps(e)) for e in more) // 1024
        assert grown_kib < held_kib / 3, (grown_kib, held_kib)

        # Now the slow clients read: they were told to resync, and after it nothing is lost.
        msgs = read_frames(
            slow,
            lambda m: (
                (m["type"] == "resync" and m["lastEventId"] >= final)
                or m.get("event", {}).get("id") == final
            ),
        )
        resyncs = [i for i, m in enumerate(msgs) if m["type"] == "resync"]
        assert resyncs and msgs[resyncs[-1]]["reason"] == "slow_client"
        after = msgs[resyncs[-1]]["lastEventId"]
        tail = [m["event"]["id"] for m in msgs[resyncs[-1] + 1 :]]
        assert_exact_stream(tail, [i for i in db_event_ids(db_url, None, after) if i <= final])
        msgs = read_frames(
            slow_run,
            lambda m: (
                (m["type"] == "snapshot" and m["run"]["status"] == "failed")
                or m.get("event", {}).get("event") == "run_failed"
            ),
        )
        kinds = [m["type"] for m in msgs]
        i = kinds.index("resync")
        assert msgs[i]["reason"] == "slow_client" and kinds[i + 1] == "snapshot"
        last = max(j for j, k in enumerate(kinds) if k == "snapshot")
        tail = [m["event"]["id"] for m in msgs[last + 1 :]]
        assert_exact_stream(tail, db_event_ids(db_url, first_run, msgs[last]["lastEventId"]))
        slow.close()
        slow_run.close()
        assert api.popen.poll() is None


# --- refusals -------------------------------------------------------------------------------


def close_code(ws: ClientConnection) -> int | None:
    with pytest.raises(ConnectionClosed) as info:
        while True:
            ws.recv(timeout=10)
    assert info.value.rcvd is not None
    return info.value.rcvd.code


def test_token_is_required_on_both_endpoints(db_url: str, tmp_path: Path) -> None:
    run_id = submit(db_url, {"steps": [{"name": "a", "tool": "DELAY", "input": {"ms": 0}}]})
    with api_server(db_url, tmp_path, PGDAG_API_TOKEN="s3cret") as base:
        for path in ("/ws", f"/ws/runs/{run_id}"):
            with ws_connect(base, path) as ws:
                assert close_code(ws) == 4401
            with ws_connect(base, path, token="wrong") as ws:
                assert close_code(ws) == 4401
            with ws_connect(base, path, headers={"Authorization": "Bearer wrong"}) as ws:
                assert close_code(ws) == 4401
            with ws_connect(base, path, token="s3cret") as ws:
                assert recv(ws)["type"] in ("hello", "snapshot")
            with ws_connect(base, path, headers={"Authorization": "Bearer s3cret"}) as ws:
                assert recv(ws)["type"] in ("hello", "snapshot")


def test_unknown_run_bad_parameters_and_foreign_origin_are_refused(
    db_url: str, tmp_path: Path
) -> None:
    with api_server(db_url, tmp_path) as base:
        for run in ("00000000-0000-0000-0000-000000000000", "not-a-uuid"):
            with ws_connect(base, f"/ws/runs/{run}") as ws:
                assert recv(ws)["error"] == "not_found"
                assert close_code(ws) == 4404
            with ws_connect(base, f"/ws/runs/{run}", after=3) as ws:
                assert recv(ws)["error"] == "not_found"
                assert close_code(ws) == 4404
        with ws_connect(base, "/ws", after="yesterday") as ws:
            assert recv(ws)["error"] == "invalid_request"
            assert close_code(ws) == 4400
        with pytest.raises(InvalidStatus) as info:
            ws_connect(base, "/ws", headers={"Origin": "http://evil.example"})
        assert info.value.response.status_code == 403
        same = "http://" + base.removeprefix("http://")
        with ws_connect(base, "/ws", headers={"Origin": same}) as ws:
            assert recv(ws)["type"] == "hello"


# --- the benchmark still runs -----------------------------------------------------------------


def test_ws_latency_benchmark_smoke(db_url: str) -> None:
    from benchmarks.ws_latency import bench_ws_latency, format_line

    for batch in (False, True):
        r = bench_ws_latency(db_url, clients=20, rate=50, seconds=2, batch=batch)
        print(format_line(r))
        assert r["samples"] > 0 and r["resyncs"] == 0
        assert r["eventsPerClientMin"] == r["eventsPerClientMax"] > 0  # everyone got everything
        assert 0 < r["p50Ms"] <= r["p99Ms"]
