"""Procrastinate, driven through its public API (``App``, ``PsycopgConnector``, ``@app.task``,
``batch_defer_async``, ``run_worker_async``).

Settings, from Procrastinate's docs:

- schema by ``app.schema_manager.apply_schema_async()`` (what ``procrastinate schema
  --apply`` runs);
- an ``async`` no-op task and ``concurrency`` = `CONCURRENCY` sub-workers per process
  (docs/howto/concurrency.md: "launch multiple asynchronous sub-workers", example
  ``concurrency=30``; the docs say not to use concurrency with blocking sync tasks).
  Measured here (5,000 jobs, 2 processes, machine shared), jobs/s: concurrency 5: 171 and
  160; 10: 107 and 199; 30: 94 and 176. More sub-workers do not help (each job costs a fetch
  and a finish transaction, and the CPU is the limit), so we keep 10;
- a connection pool of ``concurrency + 1`` (docs/discussions.md, "Mind the size of your
  PostgreSQL pool": short jobs want as many connections as sub-workers, plus one);
- ``listen_notify=True`` (the default: a worker wakes on the ``job_inserted`` NOTIFY, and
  ``fetch_job_polling_interval`` stays at its 5 s default as the fallback);
- ``delete_jobs="never"`` (the default: finished jobs stay in ``procrastinate_jobs``).

W1 enqueues with one ``batch_defer_async`` call (docs/howto/basics/batch_defer.md) and
counts ``todo``/``doing`` rows down to zero. It runs at most `W1_MAX_JOBS` jobs: 20,000
took over 100 s here.

``python -m benchmarks.peers.worker procrastinate --dsn URL [--starts FILE]`` runs
one worker process (see `_common` for the start barrier).
"""

from __future__ import annotations

import argparse
import asyncio
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import psycopg

from benchmarks.peers._common import (
    W3_IDLE_S,
    W3_WARMUP_JOBS,
    Budget,
    PeerBenchError,
    StartRecorder,
    WorkerGroup,
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
    from procrastinate import App
    from procrastinate.tasks import Task

VERSION = installed_version("procrastinate")
CONCURRENCY = 10
W1_MAX_JOBS = 5_000
TASK_NAME = "bench_noop"
CONFIG = (
    f"procrastinate {VERSION}: async task, concurrency={CONCURRENCY} per process, pool"
    f" max_size={CONCURRENCY + 1}, listen_notify=True, delete_jobs=never"
    " (docs: howto concurrency, discussions 'Mind the size of your PostgreSQL pool');"
    f" one batch_defer_async; w1 capped at {W1_MAX_JOBS:,} jobs"
)

_recorder: StartRecorder | None = None


def available() -> str | None:
    """None if Procrastinate imports, else why not."""
    return import_problem("procrastinate")


async def _noop(seq: int | None = None) -> None:
    started_ns = time.time_ns()
    if _recorder is not None and seq is not None:
        _recorder.record(seq, started_ns)


def _app(dsn: str, pool_size: int) -> tuple[App, Task[Any, Any, Any]]:
    """A Procrastinate app on `dsn` with the benchmark's one task registered."""
    from procrastinate import App, PsycopgConnector

    app = App(connector=PsycopgConnector(conninfo=dsn, min_size=1, max_size=pool_size))
    task = app.task(name=TASK_NAME)(_noop)
    return app, task


async def _install_and_enqueue(dsn: str, jobs: int) -> float:
    """Apply Procrastinate's schema in `dsn`, defer `jobs` no-op jobs in one batch call and
    return the seconds the defer took."""
    app, task = _app(dsn, pool_size=2)
    async with app.open_async():
        await app.schema_manager.apply_schema_async()
        if not jobs:
            return 0.0
        t0 = time.perf_counter()
        await task.batch_defer_async(*({} for _ in range(jobs)))
        return time.perf_counter() - t0


def w1(dsn: str, jobs: int, processes: int = 2) -> dict[str, Any]:
    """W1 flat drain in the empty database `dsn`: apply the schema, defer min(`jobs`,
    `W1_MAX_JOBS`) no-op jobs, then drain them with `processes` worker processes.
    ``drainS`` runs from releasing the ready workers to no job being ``todo`` or ``doing``
    (seconds). Procrastinate drains a few hundred jobs/s here (one fetch and one finish
    transaction per job), so 20,000 would not fit the call's budget: larger sizes are
    capped and the result says ``requestedJobs``.

    Raises `PeerBenchError` if a job fails, a worker dies or the call overruns its budget."""
    requested, jobs = jobs, min(jobs, W1_MAX_JOBS)
    budget = Budget(f"procrastinate w1 ({jobs} jobs, {processes} processes)")
    enqueue_s = run_async(_install_and_enqueue(dsn, jobs), budget, "installing and deferring")
    argvs = [["--dsn", dsn, "--concurrency", str(CONCURRENCY)] for _ in range(processes)]
    with (
        worker_processes(budget.what, "procrastinate", argvs, budget) as group,
        psycopg.connect(dsn, autocommit=True) as conn,
    ):

        def done() -> tuple[bool, str]:
            left, failed = conn.execute(
                "SELECT count(*) FILTER (WHERE status IN ('todo', 'doing')),"
                " count(*) FILTER (WHERE status NOT IN ('todo', 'doing', 'succeeded'))"
                " FROM procrastinate_jobs"
            ).fetchone()  # type: ignore[misc]
            if failed:
                raise PeerBenchError(f"{budget.what}: {failed} jobs did not succeed")
            return left == 0, f"{left} of {jobs} jobs not done"

        group.go()
        t0 = time.monotonic()
        t1 = wait_drained(done, group, budget)
    return drain_result(jobs, enqueue_s, t1 - t0, CONFIG, requested=requested)


def w3(dsn: str, jobs: int, rate_per_s: float) -> dict[str, Any]:
    """W3 pickup latency at idle in the empty database `dsn`: one worker process waiting,
    `jobs` jobs deferred one at a time at `rate_per_s`; latency is from ``defer_async``
    returning to the task function starting (both ``time.time_ns()``; the task appends its
    start to a file). Returns p50/p99/max in milliseconds."""
    budget = Budget(f"procrastinate w3 ({jobs} jobs at {rate_per_s}/s)")
    run_async(_install_and_enqueue(dsn, 0), budget, "installing")
    with (
        starts_file("procrastinate") as starts,
        worker_processes(
            budget.what,
            "procrastinate",
            [["--dsn", dsn, "--starts", str(starts), "--concurrency", str(CONCURRENCY)]],
            budget,
        ) as group,
    ):
        group.go()
        enqueued = run_async(
            _w3_submit(dsn, jobs, rate_per_s, starts, group, budget), budget, "deferring"
        )
        started = wait_started(starts, list(enqueued), group, budget)
    return latency_summary(enqueued, started, CONFIG)


async def _w3_submit(
    dsn: str, jobs: int, rate_per_s: float, starts: Path, group: WorkerGroup, budget: Budget
) -> dict[int, int]:
    app, task = _app(dsn, pool_size=2)
    async with app.open_async():
        warmup = list(range(-W3_WARMUP_JOBS, 0))
        for seq in warmup:
            await task.defer_async(seq=seq)
        await asyncio.to_thread(wait_started, starts, warmup, group, budget)
        await asyncio.sleep(W3_IDLE_S)
        enqueued: dict[int, int] = {}
        async for seq in aslot_times(jobs, rate_per_s):
            await task.defer_async(seq=seq)
            enqueued[seq] = time.time_ns()
        return enqueued


# --- worker process ------------------------------------------------------------------


async def _worker(dsn: str, starts: str | None, concurrency: int) -> None:
    global _recorder
    _recorder = StartRecorder(starts) if starts else None
    app, _ = _app(dsn, pool_size=concurrency + 1)
    async with app.open_async():
        start_barrier()
        # Procrastinate's own SIGTERM/SIGINT handlers stop the worker gracefully.
        await app.run_worker_async(concurrency=concurrency, listen_notify=True)


def worker_main(argv: list[str]) -> None:
    """Run one worker process; `argv` as for ``python -m benchmarks.peers.worker procrastinate``."""
    p = argparse.ArgumentParser(prog="python -m benchmarks.peers.worker procrastinate")
    p.add_argument("--dsn", required=True)
    p.add_argument("--starts", help="append '<seq> <start ns>' per job to this file (W3)")
    p.add_argument("--concurrency", type=int, default=CONCURRENCY)
    args = p.parse_args(argv)
    asyncio.run(_worker(args.dsn, args.starts, args.concurrency))
