"""PgQueuer, driven through its public API (``Queries``, ``PgQueuer``, ``@entrypoint``).

Settings, from PgQueuer's own guidance:

- schema by ``Queries.install()`` (what ``pgq install`` runs), durability ``durable`` (the
  default; the faster ``balanced``/``volatile`` modes use unlogged tables), then
  ``Queries.optimize_autovacuum()`` (``pgq autovac``: fillfactor 70 and eager autovacuum on
  the queue table), both from docs/guides/performance-tuning.md's checklist;
- ``batch_size`` = `BATCH_SIZE` jobs per dequeue: the guide says to raise it from its
  default of 10 when jobs are short-lived (< 1 s) and uses 25 in its example. Measured here
  (20,000 no-op jobs, 2 processes x 2 consumers, on a machine shared with other work), median
  jobs/s: batch 10: 1,500 (3 runs); 25: 2,800 (6 runs); 50: 2,700 (6 runs); 100: 2,600 and
  5,000 (2 runs). Above 10 the noise hides any difference, so we keep the guide's 25;
- `CONSUMERS_PER_PROCESS` ``PgQueuer`` instances per worker process, each on its own
  connection, as tools/benchmark.py runs several dequeue tasks;
- the asyncpg driver when ``asyncpg`` is installed (the guide's recommendation for
  throughput), else psycopg's async driver (what ``pip install pgqueuer`` alone gives);
- uvloop when installed, as ``pgq run`` does.

The job is an async no-op. W1 enqueues all jobs with one batch ``Queries.enqueue`` call (one
statement over arrays) and counts the ``pgqueuer`` table down to empty: a job leaves it
when its completion is logged.

``python -m benchmarks.peers.worker pgqueuer --dsn URL [--starts FILE]`` runs one
worker process (see `_common` for the start barrier).
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import signal
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import psycopg

from benchmarks.peers._common import (
    W3_IDLE_S,
    W3_WARMUP_JOBS,
    Budget,
    PeerBenchError,
    StartRecorder,
    WorkerGroup,
    as_url,
    aslot_times,
    drain_result,
    import_problem,
    installed_version,
    latency_summary,
    run_async,
    start_barrier,
    starts_file,
    wait_drained,
    wait_started,
    worker_processes,
)

if TYPE_CHECKING:
    from pgqueuer.ports.driver import Driver

VERSION = installed_version("pgqueuer")
BATCH_SIZE = 25
CONSUMERS_PER_PROCESS = 2
ENTRYPOINT = "noop"
QUEUE_TABLE = "pgqueuer"  # the default name (no PGQUEUER_PREFIX)


def _driver_name() -> str:
    return "psycopg" if import_problem("asyncpg") else "asyncpg"


CONFIG = (
    f"pgqueuer {VERSION}: {_driver_name()} driver, {CONSUMERS_PER_PROCESS} PgQueuer consumers"
    f" per process each on its own connection, batch_size={BATCH_SIZE} (guide: raise the"
    " default 10 for short jobs), durable tables + `pgq autovac`"
    " (docs/guides/performance-tuning.md, tools/benchmark.py); one batch enqueue"
)


def available() -> str | None:
    """None if PgQueuer imports, else why not."""
    return import_problem("pgqueuer")


class _Closeable(Protocol):
    async def close(self) -> None: ...


async def _connect(dsn: str) -> tuple[Driver, _Closeable]:
    """A PgQueuer driver on a new connection (asyncpg when installed, else psycopg), and
    that connection, which the caller closes (PgQueuer's drivers do not)."""
    if _driver_name() == "asyncpg":
        from pgqueuer.db import AsyncpgDriver

        asyncpg: Any = importlib.import_module("asyncpg")  # optional, and untyped
        apg = await asyncpg.connect(as_url(dsn))
        return AsyncpgDriver(apg), apg
    from pgqueuer.db import PsycopgDriver

    conn = await psycopg.AsyncConnection.connect(dsn, autocommit=True)
    return PsycopgDriver(conn), conn


async def _install_and_enqueue(dsn: str, jobs: int) -> float:
    """Install PgQueuer's schema in `dsn`, enqueue `jobs` no-op jobs in one batch call and
    return the seconds the enqueue took."""
    from pgqueuer.queries import Queries

    driver, conn = await _connect(dsn)
    try:
        q = Queries(driver)
        await q.install()
        await q.optimize_autovacuum()
        if not jobs:
            return 0.0
        t0 = time.perf_counter()
        await q.enqueue([ENTRYPOINT] * jobs, [None] * jobs, [0] * jobs)
        return time.perf_counter() - t0
    finally:
        await conn.close()


def w1(dsn: str, jobs: int, processes: int = 2) -> dict[str, Any]:
    """W1 flat drain in the empty database `dsn`: install, enqueue `jobs` no-op jobs, then
    drain them with `processes` worker processes. ``drainS`` runs from releasing the ready
    workers to the queue table being empty (seconds); ``jobsPerS`` = jobs / drainS.
    ``cost``: WAL bytes and commits of the drain (`CostMeter`, read after the enqueue and
    after the workers exited; their start-up and shutdown are in it), in all and per job.

    Raises `PeerBenchError` if a worker dies or the call overruns its budget."""
    # imports the engine: not in worker processes
    from benchmarks.common import CostMeter, cpu_s, parent_pid, postgres_cpu_s

    budget = Budget(f"pgqueuer w1 ({jobs} jobs, {processes} processes)")
    enqueue_s = run_async(_install_and_enqueue(dsn, jobs), budget, "installing and enqueueing")
    argvs = [["--dsn", dsn, *_settings_argv()] for _ in range(processes)]
    meter = CostMeter(dsn)
    meter.before(timeout_s=max(budget.left(), 1.0))
    polls = 0  # queries of our own monitoring connection: its commits are subtracted
    with (
        worker_processes(budget.what, "pgqueuer", argvs, budget) as group,
        psycopg.connect(dsn, autocommit=True) as conn,
    ):

        def done() -> tuple[bool, str]:
            nonlocal polls
            polls += 1
            left = conn.execute(f"SELECT count(*) FROM {QUEUE_TABLE}").fetchone()[0]  # type: ignore[index]
            if left:
                return False, f"{left} of {jobs} jobs not done"
            # A finished job leaves the queue table and gets a log row in one statement.
            polls += 1
            ok = conn.execute(
                f"SELECT count(*) FROM {QUEUE_TABLE}_log WHERE status = 'successful'"
            ).fetchone()[0]  # type: ignore[index]
            if ok != jobs:
                raise PeerBenchError(f"{budget.what}: {jobs - ok} jobs did not succeed")
            return True, ""

        postmaster = parent_pid(int(conn.execute("SELECT pg_backend_pid()").fetchone()[0]))  # type: ignore[index]
        polls += 1
        pids = [w.proc.pid for w in group.workers]
        cpu0 = [cpu_s(p) for p in pids], postgres_cpu_s(postmaster)
        group.go()
        t0 = time.monotonic()
        t1 = wait_drained(done, group, budget)
        cpu1 = [cpu_s(p) for p in pids], postgres_cpu_s(postmaster)
    result = drain_result(jobs, enqueue_s, t1 - t0, CONFIG)
    # CPU microseconds per job from the release of the ready workers to the drained queue,
    # as pgdag's W1 reports it (benchmarks.pgdag_bench._drain)
    result["cpuUsPerJob"] = {
        "postgres": round((cpu1[1] - cpu0[1]) / jobs * 1e6),
        "workers": round(sum(b - a for a, b in zip(cpu0[0], cpu1[0], strict=True)) / jobs * 1e6),
    }
    result["cost"] = meter.after(
        jobs, monitor_commits=polls + 1, timeout_s=max(budget.left(), 5.0)
    )  # + 1: its start-up
    return result


def w3(dsn: str, jobs: int, rate_per_s: float) -> dict[str, Any]:
    """W3 pickup latency at idle in the empty database `dsn`: one worker process waiting,
    `jobs` jobs enqueued one at a time at `rate_per_s`; latency is from the enqueue call
    returning to the job function starting (both ``time.time_ns()``; the job appends its
    start to a file). Returns p50/p99/max in milliseconds."""
    budget = Budget(f"pgqueuer w3 ({jobs} jobs at {rate_per_s}/s)")
    run_async(_install_and_enqueue(dsn, 0), budget, "installing")
    with (
        starts_file("pgqueuer") as starts,
        worker_processes(
            budget.what,
            "pgqueuer",
            [["--dsn", dsn, "--starts", str(starts), *_settings_argv()]],
            budget,
        ) as group,
    ):
        group.go()
        enqueued = run_async(
            _w3_submit(dsn, jobs, rate_per_s, starts, group, budget), budget, "submitting"
        )
        started = wait_started(starts, list(enqueued), group, budget)
    return latency_summary(enqueued, started, CONFIG)


async def _w3_submit(
    dsn: str, jobs: int, rate_per_s: float, starts: Path, group: WorkerGroup, budget: Budget
) -> dict[int, int]:
    from pgqueuer.queries import Queries

    driver, conn = await _connect(dsn)
    try:
        q = Queries(driver)
        warmup = list(range(-W3_WARMUP_JOBS, 0))
        for seq in warmup:
            await q.enqueue(ENTRYPOINT, str(seq).encode())
        await asyncio.to_thread(wait_started, starts, warmup, group, budget)
        await asyncio.sleep(W3_IDLE_S)
        enqueued: dict[int, int] = {}
        async for seq in aslot_times(jobs, rate_per_s):
            await q.enqueue(ENTRYPOINT, str(seq).encode())
            enqueued[seq] = time.time_ns()
        return enqueued
    finally:
        await conn.close()


# --- worker process ------------------------------------------------------------------


def _settings_argv() -> list[str]:
    return ["--batch-size", str(BATCH_SIZE), "--consumers", str(CONSUMERS_PER_PROCESS)]


async def _worker(dsn: str, starts: str | None, batch_size: int, consumers_n: int) -> None:
    from pgqueuer import PgQueuer
    from pgqueuer.models import Job

    recorder = StartRecorder(starts) if starts else None
    consumers: list[PgQueuer] = []
    conns: list[_Closeable] = []
    for _ in range(consumers_n):
        driver, conn = await _connect(dsn)
        conns.append(conn)
        pgq = PgQueuer(driver)

        @pgq.entrypoint(ENTRYPOINT)
        async def noop(job: Job) -> None:
            started_ns = time.time_ns()
            if recorder is not None and job.payload is not None:
                recorder.record(int(job.payload), started_ns)

        consumers.append(pgq)
    start_barrier()

    def stop() -> None:
        for c in consumers:
            c.shutdown.set()

    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop)
    try:
        await asyncio.gather(*(c.run(batch_size=batch_size) for c in consumers))
    finally:
        for conn in conns:
            await conn.close()


def worker_main(argv: list[str]) -> None:
    """Run one worker process; `argv` as for ``python -m benchmarks.peers.worker pgqueuer``."""
    p = argparse.ArgumentParser(prog="python -m benchmarks.peers.worker pgqueuer")
    p.add_argument("--dsn", required=True)
    p.add_argument("--starts", help="append '<seq> <start ns>' per job to this file (W3)")
    p.add_argument("--batch-size", type=int, default=BATCH_SIZE)
    p.add_argument("--consumers", type=int, default=CONSUMERS_PER_PROCESS)
    args = p.parse_args(argv)
    work = _worker(args.dsn, args.starts, args.batch_size, args.consumers)
    if import_problem("uvloop"):
        asyncio.run(work)
    else:
        import uvloop

        uvloop.run(work)
