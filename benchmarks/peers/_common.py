"""What every peer driver shares: worker subprocesses behind a start barrier, deadlines,
paced submission, the pickup-latency record, and percentiles.

Worker protocol. A driver starts ``python -m benchmarks.peers.worker <peer> ...``
processes. Each one imports its peer, connects and registers its job functions, prints
``ready`` on stdout, then blocks reading stdin until the driver writes ``go``. The drain
clock starts when the driver has written ``go`` to every worker, so interpreter start-up and
imports (seconds for some peers) are not counted as queue throughput. Workers are stopped
with SIGTERM (each peer's own graceful shutdown), then SIGKILL after a grace period; their
stderr goes to a temporary file whose tail is quoted in any failure.

Pickup latency (W3). The job function's first statement is ``time.time_ns()``; the worker
appends ``<seq> <ns>`` to a file named by the driver (one ``os.write`` on an ``O_APPEND``
descriptor, so lines from threads or processes never interleave). The driver takes its own
``time.time_ns()`` when the peer's enqueue call has returned (the enqueue is committed
then), so both ends use this machine's wall clock.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.metadata
import math
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, TypeVar
from urllib.parse import quote, urlencode

import psycopg

ROOT = Path(__file__).resolve().parents[2]
T = TypeVar("T")

CALL_BUDGET_S = 100.0
"""Wall-clock budget of one w1/w2/w3 call, start-up and teardown included; the brief is
"well under 2 minutes" on a 2-core machine."""
READY_TIMEOUT_S = 45.0
"""How long worker processes may take to import their peer and connect."""
STOP_GRACE_S = 10.0
"""How long a worker gets to shut down after SIGTERM before it is killed."""
POLL_S = 0.02
"""The shortest interval at which the driver polls a peer's table (or a W3 start file)."""
POLL_MAX_S = 0.5
"""The longest interval at which the driver polls a peer's table during a drain."""
W3_WARMUP_JOBS = 5
"""Jobs run (and discarded) before the W3 measurement: first-call costs such as lazy imports
and prepared statements are not pickup latency."""
W3_IDLE_S = 0.5
"""Idle pause after the warm-up, so the measured jobs meet a worker that is waiting."""


class PeerBenchError(RuntimeError):
    """A peer benchmark failed: a worker died, or the peer missed a deadline."""


def installed_version(dist: str) -> str:
    """The installed version of distribution `dist`, or ``"not installed"``."""
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def import_problem(module: str) -> str | None:
    """None when `module` imports, else why not (for ``available()``)."""
    try:
        __import__(module)
    except Exception as e:  # any import-time failure makes the peer unavailable
        return f"{module} does not import: {type(e).__name__}: {e}"
    return None


@dataclass
class Budget:
    """A deadline for one driver call; `left()` is what remains of it, in seconds."""

    what: str
    seconds: float = CALL_BUDGET_S
    started: float = field(default_factory=time.monotonic)

    def left(self) -> float:
        return self.seconds - (time.monotonic() - self.started)

    def expired(self, doing: str, detail: str = "") -> PeerBenchError:
        extra = f"; {detail}" if detail else ""
        return PeerBenchError(
            f"{self.what}: no result within its {self.seconds:.0f} s budget while {doing}{extra}"
        )


def run_async(coro: Coroutine[Any, Any, T], budget: Budget, doing: str) -> T:
    """Run `coro` on a fresh event loop, cancelled (and `PeerBenchError` raised) when the
    budget runs out."""

    async def bounded() -> T:
        try:
            return await asyncio.wait_for(coro, timeout=max(budget.left(), 0.001))
        except TimeoutError:
            raise budget.expired(doing) from None

    return asyncio.run(bounded())


def as_url(dsn: str) -> str:
    """`dsn` as a ``postgresql://`` URL: the harness may pass libpq ``key=value`` strings,
    which some peers (DBOS via SQLAlchemy, asyncpg) do not parse."""
    if dsn.startswith(("postgresql://", "postgres://")):
        return dsn
    info = {k: str(v) for k, v in psycopg.conninfo.conninfo_to_dict(dsn).items()}
    user = quote(info.pop("user", ""), safe="")
    password = info.pop("password", None)
    auth = f"{user}:{quote(password, safe='')}@" if password is not None else f"{user}@"
    host = info.pop("host", "")
    if host.startswith("/"):  # a Unix socket directory goes in the query string
        info["host"], host = host, ""
    port = info.pop("port", "")
    netloc = f"{auth if user or password else ''}{host}{':' + port if port else ''}"
    dbname = quote(info.pop("dbname", ""), safe="")
    query = f"?{urlencode(info)}" if info else ""
    return f"postgresql://{netloc}/{dbname}{query}"


def child_env() -> dict[str, str]:
    """The environment of a worker process: ours, with the project root importable."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


@dataclass
class _Worker:
    proc: subprocess.Popen[str]
    stderr: IO[bytes]

    def tail(self, chars: int = 2000) -> str:
        self.stderr.flush()
        with open(self.stderr.name, "rb") as f:
            data = f.read()
        return data[-chars:].decode(errors="replace").strip()


@dataclass
class WorkerGroup:
    """Worker processes started by `worker_processes`; `go()` releases them."""

    what: str
    workers: list[_Worker]

    def check_alive(self) -> None:
        """Raise `PeerBenchError` with its stderr if any worker has exited."""
        for i, w in enumerate(self.workers):
            code = w.proc.poll()
            if code is not None:
                raise PeerBenchError(
                    f"{self.what}: worker {i} exited with code {code}; its stderr ends:\n{w.tail()}"
                )

    def wait_ready(self, budget: Budget) -> None:
        """Wait until every worker has printed ``ready`` (other stdout lines are skipped)."""
        deadline = time.monotonic() + min(READY_TIMEOUT_S, max(budget.left(), 0.0))
        for i, w in enumerate(self.workers):
            assert w.proc.stdout is not None
            line = "-"
            while line and line.strip() != "ready":
                line = _readline_until(w.proc.stdout, deadline)
            if not line:
                self.check_alive()
                raise PeerBenchError(
                    f"{self.what}: worker {i} did not report ready within"
                    f" {READY_TIMEOUT_S:.0f} s; its stderr ends:\n{w.tail()}"
                )

    def go(self) -> None:
        """Release every worker from its start barrier."""
        for w in self.workers:
            assert w.proc.stdin is not None
            w.proc.stdin.write("go\n")
            w.proc.stdin.flush()

    def stop(self) -> None:
        for w in self.workers:
            if w.proc.poll() is None:
                w.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + STOP_GRACE_S
        for w in self.workers:
            try:
                w.proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                w.proc.kill()
                w.proc.wait(timeout=5)
        for w in self.workers:
            for stream in (w.proc.stdin, w.proc.stdout):
                if stream is not None:
                    with contextlib.suppress(OSError):
                        stream.close()
            w.stderr.close()
            with contextlib.suppress(OSError):
                os.unlink(w.stderr.name)


def _readline_until(stream: IO[str], deadline: float) -> str:
    """One line from a child's stdout pipe, or "" once `deadline` (monotonic) passes."""
    import selectors

    with selectors.DefaultSelector() as sel:
        sel.register(stream, selectors.EVENT_READ)
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return ""
            if sel.select(timeout=left):
                return stream.readline()


@contextlib.contextmanager
def worker_processes(
    what: str, peer: str, argvs: Sequence[Sequence[str]], budget: Budget
) -> Iterator[WorkerGroup]:
    """Start one ``python -m benchmarks.peers.worker <peer> <argv...>`` per entry of `argvs`
    (`peer` as in `worker.PEER_MODULES`), wait until each
    has said ``ready`` (raising `PeerBenchError` with its stderr if not), and yield them
    still held at their start barrier. All are stopped on exit, also on error."""
    workers: list[_Worker] = []
    group = WorkerGroup(what, workers)
    try:
        for argv in argvs:
            err = tempfile.NamedTemporaryFile(prefix="peer-worker-", suffix=".log", delete=False)  # noqa: SIM115 (closed in stop())
            proc = subprocess.Popen(
                [sys.executable, "-m", "benchmarks.peers.worker", peer, *argv],
                env=child_env(),
                cwd=ROOT,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=err,
                text=True,
            )
            workers.append(_Worker(proc, err))
        group.wait_ready(budget)
        yield group
    finally:
        group.stop()


def wait_drained(done: Callable[[], tuple[bool, str]], group: WorkerGroup, budget: Budget) -> float:
    """Poll `done` (which returns ``(finished, progress text)``) until it says finished;
    return the monotonic time it first did. The poll interval is 1 % of the time waited so
    far, between `POLL_S` and `POLL_MAX_S`: the error stays near 1 % of the drain while the
    polling query costs the 2-core machine little. Raises `PeerBenchError` if a worker dies
    or the budget runs out."""
    progress = ""
    t0 = time.monotonic()
    while True:
        finished, progress = done()
        now = time.monotonic()
        if finished:
            return now
        group.check_alive()
        if budget.left() <= 0:
            raise budget.expired("draining", progress)
        time.sleep(min(POLL_MAX_S, max(POLL_S, 0.01 * (now - t0))))


# --- worker side -------------------------------------------------------------------


def start_barrier() -> None:
    """Worker side of the start barrier: say ``ready``, then wait for ``go`` on stdin.
    Exits quietly if the driver closes stdin instead (it gave up). Afterwards stdout goes
    to stderr: nobody reads the stdout pipe any more, and a full pipe would block."""
    sys.stdout.write("ready\n")
    sys.stdout.flush()
    if sys.stdin.readline().strip() != "go":
        raise SystemExit(0)
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())


class StartRecorder:
    """Appends ``<seq> <time.time_ns()>`` lines to a file; safe across threads and processes."""

    def __init__(self, path: str) -> None:
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def record(self, seq: int, started_ns: int) -> None:
        os.write(self._fd, f"{seq} {started_ns}\n".encode())


# --- driver side: W3 ---------------------------------------------------------------


@contextlib.contextmanager
def starts_file(peer: str) -> Iterator[Path]:
    """A fresh path for a W3 start record, removed afterwards."""
    fd, name = tempfile.mkstemp(prefix=f"{peer}-starts-", suffix=".txt")
    os.close(fd)
    try:
        yield Path(name)
    finally:
        with contextlib.suppress(OSError):
            os.unlink(name)


def read_starts(path: Path) -> dict[int, int]:
    """The ``seq -> start ns`` lines a `StartRecorder` wrote (first start of each seq)."""
    starts: dict[int, int] = {}
    if not path.exists():
        return starts
    for line in path.read_text().splitlines():
        parts = line.split()
        if len(parts) == 2:
            starts.setdefault(int(parts[0]), int(parts[1]))
    return starts


def wait_started(
    path: Path, seqs: Sequence[int], group: WorkerGroup, budget: Budget
) -> dict[int, int]:
    """Wait until every seq in `seqs` has a start line in `path`; return all start lines."""
    want = set(seqs)
    while True:
        starts = read_starts(path)
        missing = want - starts.keys()
        if not missing:
            return starts
        group.check_alive()
        if budget.left() <= 0:
            raise budget.expired(
                "waiting for W3 jobs to start",
                f"{len(missing)} of {len(want)} not started, e.g. seq {min(missing)}",
            )
        time.sleep(POLL_S)


def slot_times(n: int, rate_per_s: float) -> Iterator[int]:
    """Yield i for i in 0..n-1, each at monotonic time ``t0 + i/rate`` (an open-loop
    schedule: a slow enqueue does not push later slots back)."""
    t0 = time.monotonic()
    for i in range(n):
        delay = t0 + i / rate_per_s - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        yield i


async def aslot_times(n: int, rate_per_s: float) -> AsyncIterator[int]:
    """`slot_times` for asyncio code."""
    t0 = time.monotonic()
    for i in range(n):
        delay = t0 + i / rate_per_s - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        yield i


def latency_summary(
    enqueued_ns: dict[int, int], started_ns: dict[int, int], config: str
) -> dict[str, Any]:
    """The W3 result: pickup latency (start minus enqueue return) over the measured seqs."""
    lat_ms = sorted((started_ns[s] - enqueued_ns[s]) / 1e6 for s in enqueued_ns)
    return {
        "n": len(lat_ms),
        "p50Ms": round(percentile(lat_ms, 50), 2),
        "p99Ms": round(percentile(lat_ms, 99), 2),
        "maxMs": round(lat_ms[-1], 2),
        "config": config,
    }


def percentile(sorted_values: Sequence[float], pct: float) -> float:
    """Nearest-rank percentile of an ascending, non-empty sequence."""
    if not sorted_values:
        raise ValueError("percentile of an empty sequence")
    rank = max(1, min(len(sorted_values), math.ceil(pct / 100 * len(sorted_values))))
    return sorted_values[rank - 1]


def drain_result(
    n: int, enqueue_s: float, drain_s: float, config: str, requested: int | None = None
) -> dict[str, Any]:
    """The W1 result dict; ``requestedJobs`` appears when the driver ran fewer jobs than
    asked (a peer too slow to drain the full size within `CALL_BUDGET_S`)."""
    result: dict[str, Any] = {
        "jobs": n,
        "enqueueS": round(enqueue_s, 3),
        "drainS": round(drain_s, 3),
        "jobsPerS": round(n / drain_s, 1),
        "config": config,
    }
    if requested is not None and requested != n:
        result["requestedJobs"] = requested
    return result
