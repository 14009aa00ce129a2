"""``python -m benchmarks.ws_latency``: how long a live event takes from its transaction to
every WebSocket client, with 100 and 1,000 clients connected to one API process.

For each client count (``--clients 100,1000``) and each message mode (``--modes
event,batch``: one frame per event, the default protocol, or ``?batch=1``) it

1. starts ``python -m engine serve`` on a scratch database (``pgdag_bench_ws``, created and
   migrated here, dropped at the end) of ``DATABASE_URL`` or the embedded cluster;
2. connects N clients to ``WS /ws`` from separate processes (lightweight clients that parse
   frame headers and pick ``id`` and ``at`` out of each event, so that the clients cost as
   little CPU as possible on a machine they share with the API and Postgres);
3. runs a producer process that performs real step transitions through the engine
   (``Store.claim`` then ``Store.complete`` of one DELAY step, the calls a worker makes) at
   ``--rate`` events per second (two events per step) for ``--seconds`` after a warm-up;
4. measures, for every event and every client, ``received - at``: ``at`` is the audit row's
   ``created_at``, i.e. ``now()`` at the start of the one-statement transaction that wrote
   it, and ``received`` is the client's ``time.time()`` when the frame's bytes arrived. Both
   clocks are this machine's, so the figure is the time from the transaction's start to
   arrival: commit-to-arrival plus the statement itself (about a millisecond);
5. counts lost events: once the producer is done, the events committed after each client's
   ``hello`` (its ``lastEventId``) are counted in the audit log; a client that has not
   received that many within `DRAIN_WAIT_S` lost the difference (``lostEvents``);
6. reads the API's RSS (``/proc/<pid>/status``) after the clients connected, and again
   after the load, and the CPU time the API used.

Prints one line per configuration and returns the figures (`run`). Opening 1,000 sockets
needs the open-files limit raised; this raises the soft limit to the hard one.
"""

from __future__ import annotations

import argparse
import array
import asyncio
import base64
import json
import multiprocessing as mp
import os
import re
import resource
import signal
import statistics
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent
WARMUP_S = 3.0
DRAIN_WAIT_S = 10.0
"""After the load, how long clients may take to receive the last event before the events
they are missing count as lost (seconds)."""
CLIENTS_PER_PROCESS = 500
PRODUCERS = 4  # concurrent claim+complete loops (one alone cannot keep 200 events/s)
ID_RE = re.compile(rb'"id": (\d+), "runId"')
AT_RE = re.compile(rb'"at": "([^"]+)"')


# --- clients (run in child processes) -----------------------------------------------------


class _Client(asyncio.Protocol):
    """A minimal WebSocket client: handshake, frame headers, pong; timestamps events."""

    def __init__(self, shared: _Shared, path: str, host: str) -> None:
        self.shared = shared
        self.path = path
        self.host = host
        self.buf = b""
        self.handshaken = False
        self.transport: Any = None  # asyncio's or uvloop's transport
        self.events = 0
        self.hello_id: int | None = None  # the hello's lastEventId: events after it are due

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        key = base64.b64encode(os.urandom(16)).decode()
        transport.write(
            f"GET {self.path} HTTP/1.1\r\nHost: {self.host}\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
            "Sec-WebSocket-Version: 13\r\n\r\n".encode()
        )

    def data_received(self, data: bytes) -> None:
        now = time.time()
        buf = self.buf + data
        if not self.handshaken:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                self.buf = buf
                return
            buf = buf[end + 4 :]
            self.handshaken = True
        pos, size_all = 0, len(buf)
        while size_all - pos >= 2:
            opcode = buf[pos] & 0x0F
            size, head = buf[pos + 1] & 0x7F, 2
            if size == 126:
                if size_all - pos < 4:
                    break
                size, head = int.from_bytes(buf[pos + 2 : pos + 4], "big"), 4
            elif size == 127:
                if size_all - pos < 10:
                    break
                size, head = int.from_bytes(buf[pos + 2 : pos + 10], "big"), 10
            if size_all - pos < head + size:
                break
            payload = buf[pos + head : pos + head + size]
            pos += head + size
            if opcode == 1:
                self.shared.on_text(self, payload, now)
            elif opcode == 9:  # ping: answer with a masked pong carrying the same payload
                self._pong(payload)
        self.buf = buf[pos:]

    def _pong(self, payload: bytes) -> None:
        assert self.transport is not None
        mask = os.urandom(4)
        masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        self.transport.write(bytes([0x8A, 0x80 | len(payload)]) + mask + masked)


class _Shared:
    """Per-process results: latency samples (ms) after the warm-up, counters."""

    def __init__(self) -> None:
        self.measure_from = float("inf")
        self.samples = array.array("d")
        self.at_cache: dict[bytes, float] = {}
        self.hellos = 0
        self.expected = 0
        self.all_connected = asyncio.Event()
        self.resyncs = 0
        self.frames = 0
        self.min_id = 1 << 62
        self.max_id = 0

    def on_text(self, client: _Client, payload: bytes, now: float) -> None:
        self.frames += 1
        if payload.startswith(b'{"type": "hello"'):
            client.hello_id = int(json.loads(payload)["lastEventId"])
            self.hellos += 1
            if self.hellos == self.expected:
                self.all_connected.set()
            return
        if payload.startswith(b'{"type": "resync"'):
            self.resyncs += 1
            return
        ats = AT_RE.findall(payload)
        client.events += len(ats)
        if now < self.measure_from:
            return
        for at in ats:
            t = self.at_cache.get(at)
            if t is None:
                t = datetime.fromisoformat(at.decode()).timestamp()
                self.at_cache[at] = t
            self.samples.append((now - t) * 1000.0)
        ids = [int(i) for i in ID_RE.findall(payload)]
        if ids:
            self.min_id = min(self.min_id, ids[0])
            self.max_id = max(self.max_id, ids[-1])


def _client_process(port: int, path: str, n: int, conn: Connection) -> None:
    """Child: connect `n` clients, report when all said hello, then measure from and until
    the times (epoch seconds) the parent sends; then wait (at most `DRAIN_WAIT_S`) until
    every client has received the events due to it, which the parent sends once the
    producer is done (``{hello lastEventId: events committed after it}``), and report."""
    _raise_nofile()

    async def go() -> dict[str, Any]:
        loop = asyncio.get_running_loop()
        shared = _Shared()
        shared.expected = n
        clients = []
        for i in range(0, n, 50):
            made = await asyncio.gather(
                *(
                    loop.create_connection(
                        lambda: _Client(shared, path, f"127.0.0.1:{port}"), "127.0.0.1", port
                    )
                    for _ in range(min(50, n - i))
                )
            )
            clients += [protocol for _, protocol in made]
        await shared.all_connected.wait()
        conn.send(("connected", sorted({c.hello_id for c in clients if c.hello_id is not None})))
        shared.measure_from, stop_at = await loop.run_in_executor(None, conn.recv)
        usage = resource.getrusage(resource.RUSAGE_SELF)
        cpu_before = usage.ru_utime + usage.ru_stime
        await asyncio.sleep(max(0.0, stop_at - time.time()))
        due: dict[int, int] = await loop.run_in_executor(None, conn.recv)
        deadline = time.monotonic() + DRAIN_WAIT_S
        # a bounded poll, once: an Event would put a check on every frame's hot path
        while time.monotonic() < deadline and any(  # noqa: ASYNC110
            c.hello_id is None or c.events < due.get(c.hello_id, 0) for c in clients
        ):
            await asyncio.sleep(0.01)
        usage = resource.getrusage(resource.RUSAGE_SELF)
        per_client = [c.events for c in clients]
        return {
            "samples": shared.samples.tobytes(),
            "resyncs": shared.resyncs,
            "frames": shared.frames,
            "perClientEvents": per_client,
            "perClientLost": [
                max(0, due.get(c.hello_id, 0) - c.events) if c.hello_id is not None else None
                for c in clients
            ],
            "cpuSeconds": usage.ru_utime + usage.ru_stime - cpu_before,
            "minId": shared.min_id,
            "maxId": shared.max_id,
        }

    try:
        import uvloop

        result = uvloop.run(go())
    except ImportError:
        result = asyncio.run(go())
    conn.send(result)


# --- producer (a child process) -------------------------------------------------------------


def _producer_process(url: str, rate: float, seconds: float, conn: Connection) -> None:
    """Child: a run of DELAY steps, then `PRODUCERS` paced loops that each claim and
    complete one step (two events) at a time, `rate` events per second in all. Reports the
    achieved rate and how long each claim and completion took until its commit returned."""

    async def go() -> dict[str, Any]:
        from engine.dag import parse_run
        from engine.db import open_pool
        from engine.store import Store
        from engine.tools import load_tool_modules

        load_tool_modules(["workers.tools.builtin"])
        n_steps = int(rate / 2 * seconds * 1.2) + 10
        body = [{"name": f"s{i}", "tool": "DELAY", "input": {"ms": 0}} for i in range(n_steps)]
        spec = parse_run({"steps": body}, max_steps=n_steps)
        pool = await open_pool(url, min_size=PRODUCERS, max_size=PRODUCERS, name="bench-producer")
        store = Store(pool, lease_ttl_s=60)
        await store.create_run(spec)
        conn.send("ready")
        await asyncio.get_running_loop().run_in_executor(None, conn.recv)  # go
        interval = 2.0 * PRODUCERS / rate
        statement_ms: list[float] = []
        start = time.monotonic()

        async def loop(offset: float) -> int:
            worker_id = f"bench-producer-{offset}"  # a lease is ended by its claimer only
            steps = 0
            next_at = start + offset
            while time.monotonic() - start < seconds:
                await asyncio.sleep(max(0.0, next_at - time.monotonic()))
                next_at += interval
                t0 = time.perf_counter()
                claimed = await store.claim(worker_id, 1)
                t1 = time.perf_counter()
                statement_ms.append((t1 - t0) * 1000)
                for step in claimed:
                    await store.complete(step, '{"ok": true}', worker_id=worker_id)
                    statement_ms.append((time.perf_counter() - t1) * 1000)
                    steps += 1
            return steps

        done = await asyncio.gather(*(loop(i * interval / PRODUCERS) for i in range(PRODUCERS)))
        took = time.monotonic() - start
        await pool.close()
        statement_ms.sort()
        return {
            "steps": sum(done),
            "seconds": took,
            "eventsPerSecond": round(2 * sum(done) / took, 1),
            "statementP50Ms": round(_percentile(statement_ms, 0.5), 1),
            "statementP99Ms": round(_percentile(statement_ms, 0.99), 1),
        }

    conn.send(asyncio.run(go()))


# --- the API process --------------------------------------------------------------------------


def _raise_nofile() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = hard if hard != resource.RLIM_INFINITY else 1 << 16
    if soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def _cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@contextmanager
def _api(url: str) -> Iterator[tuple[int, Any]]:
    import subprocess

    from benchmarks.common import free_port

    port = free_port()
    env = {**os.environ, "DATABASE_URL": url, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "engine", "serve", "--port", str(port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline or proc.poll() is not None:
                raise RuntimeError("the API did not start")
            time.sleep(0.1)
        yield port, proc
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()


def _recv(pipe: Connection, timeout_s: float, who: str) -> Any:
    if not pipe.poll(timeout_s):
        raise RuntimeError(f"{who} did not report within {timeout_s:.0f} s")
    return pipe.recv()


def _percentile(sorted_ms: list[float], q: float) -> float:
    if not sorted_ms:
        return float("nan")
    return sorted_ms[min(len(sorted_ms) - 1, int(q * len(sorted_ms)))]


def _events_due(url: str, hello_ids: set[int]) -> dict[int, int]:
    """For each hello ``lastEventId`` h: how many audit rows (events of ``/ws``) have an id
    above h, i.e. how many events a client that was told h must receive."""
    import psycopg

    with psycopg.connect(url, autocommit=True) as conn:
        rows = conn.execute(
            "SELECT h, (SELECT count(*) FROM audit_log WHERE id > h)"
            " FROM unnest(%s::bigint[]) AS h",
            (sorted(hello_ids),),
        ).fetchall()
    return {int(h): int(n) for h, n in rows}


def bench_ws_latency(
    url: str,
    *,
    clients: int,
    rate: float,
    seconds: float,
    batch: bool,
    warmup_s: float = WARMUP_S,
) -> dict[str, Any]:
    """One configuration on the migrated database `url`: `clients` clients on ``/ws``
    (``?batch=1`` when `batch`), `rate` events/s for `warmup_s` + `seconds` seconds,
    latency sampled over the last `seconds`. The figures as a dict (latencies in ms);
    ``lostEvents`` sums, over the clients, the events committed after a client's hello
    that it had not received `DRAIN_WAIT_S` after the load ended (``lostClients``: how
    many clients missed any; a ``resync`` also means the client missed events)."""
    ctx = mp.get_context("spawn")
    path = "/ws?batch=1" if batch else "/ws"
    with _api(url) as (port, api):
        rss_idle = _rss_kib(api.pid)
        producer_end, producer_conn = ctx.Pipe()
        producer = ctx.Process(
            target=_producer_process,
            args=(url, rate, seconds + warmup_s, producer_conn),
            daemon=True,
        )
        producer.start()
        assert producer_end.recv() == "ready"
        groups = [
            min(CLIENTS_PER_PROCESS, clients - i) for i in range(0, clients, CLIENTS_PER_PROCESS)
        ]
        pipes, procs = [], []
        for n in groups:
            mine, theirs = ctx.Pipe()
            proc = ctx.Process(target=_client_process, args=(port, path, n, theirs), daemon=True)
            proc.start()
            pipes.append(mine)
            procs.append(proc)
        hello_ids: set[int] = set()
        for pipe in pipes:
            if not pipe.poll(120):
                raise RuntimeError(f"{clients} clients did not connect within 120 s")
            said, ids = pipe.recv()
            assert said == "connected"
            hello_ids.update(ids)
        # Measure after the warm-up; stop a second after the load ends.
        now = time.time()
        for pipe in pipes:
            pipe.send((now + warmup_s, now + warmup_s + seconds + 1.0))
        rss_connected = _rss_kib(api.pid)
        cpu_before = _cpu_s(api.pid)
        producer_end.send("go")
        produced = _recv(producer_end, seconds + warmup_s + 60, "the producer")
        due = _events_due(url, hello_ids)
        for pipe in pipes:
            pipe.send(due)
        results = [_recv(pipe, 120, "a client process") for pipe in pipes]
        cpu_s = _cpu_s(api.pid) - cpu_before
        rss_after = _rss_kib(api.pid)
        for proc in procs:
            proc.join(10)
        producer.join(10)
    samples: list[float] = []
    for r in results:
        a = array.array("d")
        a.frombytes(r["samples"])
        samples.extend(a)
    samples.sort()
    per_client = [n for r in results for n in r["perClientEvents"]]
    lost = [n for r in results for n in r["perClientLost"]]
    return {
        "clients": clients,
        "mode": "batch" if batch else "event",
        "targetRate": rate,
        "producedEventsPerSecond": produced["eventsPerSecond"],
        "statementP50Ms": produced["statementP50Ms"],
        "statementP99Ms": produced["statementP99Ms"],
        "seconds": seconds,
        "warmupS": warmup_s,
        "samples": len(samples),
        "p50Ms": round(_percentile(samples, 0.50), 1),
        "p99Ms": round(_percentile(samples, 0.99), 1),
        "maxMs": round(samples[-1], 1) if samples else None,
        "meanMs": round(statistics.fmean(samples), 1) if samples else None,
        "resyncs": sum(r["resyncs"] for r in results),
        "eventsDue": max(due.values(), default=0),  # per client
        "lostEvents": sum(n or 0 for n in lost),
        "lostClients": sum(1 for n in lost if n is None or n > 0),
        "framesPerClientPerSecond": round(
            sum(r["frames"] for r in results) / clients / (seconds + warmup_s), 1
        ),
        "eventsPerClientMin": min(per_client) if per_client else 0,
        "eventsPerClientMax": max(per_client) if per_client else 0,
        "apiRssIdleKiB": rss_idle,
        "apiRssConnectedKiB": rss_connected,
        "apiRssAfterKiB": rss_after,
        "apiCpuSeconds": round(cpu_s, 1),
        "clientsCpuSeconds": round(sum(r["cpuSeconds"] for r in results), 1),
        "loadAverage": os.getloadavg(),
    }


def run(
    *,
    clients: list[int],
    rate: float,
    seconds: float,
    modes: list[str],
    warmup_s: float = WARMUP_S,
    base: str | None = None,
) -> list[dict[str, Any]]:
    """Every configuration on a scratch database of `base` (default ``DATABASE_URL`` or
    the embedded cluster); returns the figures (what `main` prints), for
    ``python -m benchmarks``. `seconds` measured after `warmup_s`, per configuration."""
    from benchmarks.common import scratch_db
    from engine.config import Settings
    from engine.db import resolve_database_url

    _raise_nofile()
    if base is None:
        base = resolve_database_url(Settings.from_env())
    out = []
    with scratch_db(base, "pgdag_bench_ws") as url:
        for n in clients:
            for mode in modes:
                batch = mode == "batch"
                r = bench_ws_latency(
                    url, clients=n, rate=rate, seconds=seconds, batch=batch, warmup_s=warmup_s
                )
                print(format_line(r), flush=True)
                out.append(r)
    return out


def format_line(r: dict[str, Any]) -> str:
    """One human line of figures."""
    return (
        f"ws {r['clients']:>5} clients {r['mode']:<5} {r['producedEventsPerSecond']:>6} ev/s:"
        f" p50 {r['p50Ms']} ms, p99 {r['p99Ms']} ms, max {r['maxMs']} ms"
        f" (write statement p50 {r['statementP50Ms']} / p99 {r['statementP99Ms']} ms;"
        f" {r['samples']:,} samples, {r['framesPerClientPerSecond']} frames/client/s,"
        f" {r['resyncs']} resyncs, {r['lostEvents']} events lost);"
        f" API RSS {r['apiRssConnectedKiB'] / 1024:.1f} -> {r['apiRssAfterKiB'] / 1024:.1f} MiB,"
        f" CPU API {r['apiCpuSeconds']} s, clients {r['clientsCpuSeconds']} s"
        f" in {r['seconds'] + r['warmupS']:.0f} s;"
        f" load {r['loadAverage'][0]:.2f}"
    )


def main(argv: list[str] | None = None) -> int:
    """``python -m benchmarks.ws_latency [--clients 100,1000] [--rate 200] [--seconds N]``."""
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.ws_latency",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--clients", default="100,1000", help="comma-separated client counts")
    p.add_argument("--rate", type=float, default=200.0, help="events per second")
    p.add_argument("--seconds", type=float, default=20.0, help="measured seconds per run")
    p.add_argument("--modes", default="event,batch", help="event, batch or both")
    args = p.parse_args(argv)
    clients = [int(c) for c in args.clients.split(",") if c.strip()]
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    for mode in modes:
        if mode not in ("event", "batch"):
            p.error(f"unknown mode {mode!r}")
    run(clients=clients, rate=args.rate, seconds=args.seconds, modes=modes)
    return 0


if __name__ == "__main__":
    sys.exit(main())
