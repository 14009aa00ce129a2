"""DBOS Transact, driven through its public API (``DBOS.migrate``, ``@DBOS.workflow``,
``@DBOS.step``, ``DBOSClient``: ``register_queue``, ``enqueue``).

The shape is DBOS's "queue worker" example (docs/python/examples/queue-worker.md): worker
processes configure and launch DBOS; the benchmark enqueues from outside with a
``DBOSClient``. The client also registers the queue (``DBOSClient.register_queue``, which
persists it owned by the application), so a worker polls it from ``DBOS.launch()`` on and
the start barrier sits just before launch. Settings:

- schema by ``DBOS.migrate`` (what ``dbos migrate`` runs), LISTEN/NOTIFY and the other
  system-database settings at their defaults (pool of 20);
- the queue has ``worker_concurrency`` = `WORKER_CONCURRENCY` and no global limit ("worker
  concurrency limits are recommended for most use cases", docs/python/tutorials/
  queue-tutorial.md), and every process gets its own ``executor_id``, which that page
  requires for a per-process limit;
- ``polling_interval_sec`` = `POLLING_INTERVAL_S`. DBOS queues are polled, never woken by
  NOTIFY; the default is 1.0 s, which caps a process at ``worker_concurrency`` workflow
  starts per second and puts W3's pickup near half a second. The docs give no figure for
  throughput. Measured here (W2, 1,000 workflows, 2 processes, machine shared), workflows/s
  for worker_concurrency/polling: 50/0.1 s: 70; 100/0.1: 63; 20/0.1: 61; 100/1.0: 62;
  50/0.05: 60 (one run each): DBOS is CPU-bound here and no setting stands out, so we keep
  50/0.1, which also keeps W3's pickup near 50 ms instead of 500;
- sync workflow and steps, as in the docs' examples (each workflow runs in a thread).

Workflows are enqueued with ``DBOSClient.enqueue_in_transaction``, `ENQUEUE_CHUNK` per
transaction (DBOS has no batch enqueue; this is its way to share a commit), and the drain
counts ``dbos.workflow_status`` rows until all are ``SUCCESS``. W1 runs at most
`W1_MAX_JOBS` workflows: at DBOS's rate here 20,000 would take minutes. The drain clock
includes ``DBOS.launch()`` (about 0.15 s) and the first polling interval, as it includes
the other peers' start-up.

``python -m benchmarks.peers.worker dbos --dsn URL --index I [--starts FILE]`` runs
one worker process (see `_common` for the start barrier).
"""

from __future__ import annotations

import argparse
import signal
import threading
import time
from typing import TYPE_CHECKING, Any

import psycopg

from benchmarks.peers._common import (
    W3_IDLE_S,
    W3_WARMUP_JOBS,
    Budget,
    PeerBenchError,
    StartRecorder,
    as_url,
    drain_result,
    import_problem,
    installed_version,
    latency_summary,
    slot_times,
    start_barrier,
    starts_file,
    wait_drained,
    wait_started,
    worker_processes,
)

if TYPE_CHECKING:
    from dbos import DBOSClient, EnqueueOptions

VERSION = installed_version("dbos")
WORKER_CONCURRENCY = 50
POLLING_INTERVAL_S = 0.1
ENQUEUE_CHUNK = 500
W1_MAX_JOBS = 3_000
APP_NAME = "pgdag-bench"
APP_VERSION = "bench-1"
QUEUE = "bench"
WORKFLOW = "bench_workflow"
CONFIG = (
    f"dbos {VERSION}: queue worker_concurrency={WORKER_CONCURRENCY} per process, no global"
    f" limit, polling_interval_sec={POLLING_INTERVAL_S} (default 1.0; DBOS queues are"
    " polled), executor_id per process, sys-db pool 20 (docs/python/tutorials/"
    f"queue-tutorial.md, examples/queue-worker.md); DBOSClient.enqueue_in_transaction x"
    f" {ENQUEUE_CHUNK}; w1 capped at {W1_MAX_JOBS:,} workflows"
)

_STATUS_SQL = (
    "SELECT count(*) FILTER (WHERE status = 'SUCCESS'),"
    " count(*) FILTER (WHERE status NOT IN ('SUCCESS', 'ENQUEUED', 'PENDING'))"
    " FROM dbos.workflow_status"
)


def available() -> str | None:
    """None if DBOS imports, else why not."""
    return import_problem("dbos")


def _options(seq: int) -> EnqueueOptions:
    return {
        "queue_name": QUEUE,
        "workflow_name": WORKFLOW,
        "app_version": APP_VERSION,
        "workflow_id": f"bench-{seq}",
    }


def _client(dsn: str) -> DBOSClient:
    from dbos import DBOSClient

    return DBOSClient(system_database_url=as_url(dsn), application_name=APP_NAME)


def _install_and_enqueue(dsn: str, workflows: int, steps: int) -> float:
    """Create DBOS's system schema in `dsn`, register the queue, enqueue `workflows`
    workflows of `steps` no-op steps and return the seconds the enqueue took."""
    import sqlalchemy as sa
    from dbos import DBOS

    dsn = as_url(dsn)
    DBOS.migrate(dsn)
    client = _client(dsn)
    engine = sa.create_engine(sa.make_url(dsn).set(drivername="postgresql+psycopg"))
    try:
        client.register_queue(
            QUEUE, worker_concurrency=WORKER_CONCURRENCY, polling_interval_sec=POLLING_INTERVAL_S
        )
        t0 = time.perf_counter()
        for start in range(0, workflows, ENQUEUE_CHUNK):
            with engine.begin() as conn:
                for seq in range(start, min(start + ENQUEUE_CHUNK, workflows)):
                    client.enqueue_in_transaction(conn, _options(seq), seq, steps)
        return time.perf_counter() - t0
    finally:
        engine.dispose()
        client.destroy()


def _drain(dsn: str, workflows: int, steps: int, processes: int, what: str) -> dict[str, Any]:
    budget = Budget(what)
    enqueue_s = _install_and_enqueue(dsn, workflows, steps)
    if budget.left() <= 0:
        raise budget.expired("enqueueing")
    argvs = [["--dsn", dsn, "--index", str(i)] for i in range(processes)]
    with (
        worker_processes(what, "dbos", argvs, budget) as group,
        psycopg.connect(dsn, autocommit=True) as conn,
    ):

        def done() -> tuple[bool, str]:
            succeeded, failed = conn.execute(_STATUS_SQL).fetchone()  # type: ignore[misc]
            if failed:
                raise PeerBenchError(f"{what}: {failed} workflows did not succeed")
            return succeeded == workflows, f"{succeeded} of {workflows} workflows done"

        group.go()
        t0 = time.monotonic()
        t1 = wait_drained(done, group, budget)
    return drain_result(workflows, enqueue_s, t1 - t0, CONFIG)


def w1(dsn: str, jobs: int, processes: int = 2) -> dict[str, Any]:
    """W1 in DBOS's terms, in the empty database `dsn`: min(`jobs`, `W1_MAX_JOBS`)
    workflows of one no-op step each, enqueued, then drained by `processes` worker
    processes (seconds from releasing the ready workers to every workflow ``SUCCESS``).
    At DBOS's rate here (100-160 one-step workflows/s measured) 20,000 would not fit the
    call's budget, so larger sizes are capped and the result says ``requestedJobs``.

    Raises `PeerBenchError` if a workflow fails, a worker dies or the call overruns."""
    n = min(jobs, W1_MAX_JOBS)
    r = _drain(dsn, n, 1, processes, f"dbos w1 ({n} workflows, {processes} processes)")
    return drain_result(n, r["enqueueS"], r["drainS"], CONFIG, requested=jobs)


def w2(dsn: str, workflows: int, processes: int = 2) -> dict[str, Any]:
    """W2 for DBOS, which has no DAGs: `workflows` workflows of 3 sequential no-op
    ``@DBOS.step`` calls each, enqueued, then drained by `processes` worker processes.
    Returns workflows/s and steps/s over the drain (seconds).

    Raises `PeerBenchError` if a workflow fails, a worker dies or the call overruns."""
    r = _drain(
        dsn, workflows, 3, processes, f"dbos w2 ({workflows} workflows, {processes} processes)"
    )
    return {
        "workflows": workflows,
        "steps": 3 * workflows,
        "enqueueS": r["enqueueS"],
        "drainS": r["drainS"],
        "workflowsPerS": round(workflows / r["drainS"], 1),
        "stepsPerS": round(3 * workflows / r["drainS"], 1),
        "config": CONFIG,
    }


def w3(dsn: str, jobs: int, rate_per_s: float) -> dict[str, Any]:
    """W3 pickup latency at idle in the empty database `dsn`: one worker process with the
    queue registered, `jobs` one-step workflows enqueued one at a time (``DBOSClient.enqueue``)
    at `rate_per_s`; latency is from the enqueue returning to the workflow function starting
    (both ``time.time_ns()``; the workflow appends its start to a file). Returns
    p50/p99/max in milliseconds; the floor is half the polling interval."""
    budget = Budget(f"dbos w3 ({jobs} workflows at {rate_per_s}/s)")
    _install_and_enqueue(dsn, 0, 1)
    with (
        starts_file("dbos") as starts,
        worker_processes(
            budget.what,
            "dbos",
            [["--dsn", dsn, "--index", "0", "--starts", str(starts)]],
            budget,
        ) as group,
    ):
        group.go()
        client = _client(dsn)
        try:
            warmup = list(range(-W3_WARMUP_JOBS, 0))
            for seq in warmup:
                client.enqueue(_options(seq), seq, 1)
            wait_started(starts, warmup, group, budget)
            time.sleep(W3_IDLE_S)
            enqueued: dict[int, int] = {}
            for seq in slot_times(jobs, rate_per_s):
                client.enqueue(_options(seq), seq, 1)
                enqueued[seq] = time.time_ns()
                if budget.left() <= 0:
                    raise budget.expired("enqueueing")
        finally:
            client.destroy()
        started = wait_started(starts, list(enqueued), group, budget)
    return latency_summary(enqueued, started, CONFIG)


# --- worker process ------------------------------------------------------------------


def _worker(dsn: str, index: int, starts: str | None) -> None:
    from dbos import DBOS, DBOSConfig

    recorder = StartRecorder(starts) if starts else None

    @DBOS.step(name="bench_noop_step")
    def noop_step() -> None:
        pass

    @DBOS.workflow(name=WORKFLOW)
    def bench_workflow(seq: int, steps: int) -> None:
        started_ns = time.time_ns()
        if recorder is not None:
            recorder.record(seq, started_ns)
        for _ in range(steps):
            noop_step()

    config: DBOSConfig = {
        "name": APP_NAME,
        "system_database_url": as_url(dsn),
        "executor_id": f"bench-{index}",
        "application_version": APP_VERSION,
        "log_level": "WARNING",
    }
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    DBOS(config=config)
    start_barrier()
    # The queue is already registered (by the driver's client) and owned by APP_NAME, so
    # launch starts its poller at once.
    DBOS.launch()
    try:
        stop.wait()
    finally:
        DBOS.destroy()


def worker_main(argv: list[str]) -> None:
    """Run one worker process; `argv` as for ``python -m benchmarks.peers.worker dbos``."""
    p = argparse.ArgumentParser(prog="python -m benchmarks.peers.worker dbos")
    p.add_argument("--dsn", required=True)
    p.add_argument("--index", type=int, required=True, help="makes the executor_id unique")
    p.add_argument("--starts", help="append '<seq> <start ns>' per workflow to this file (W3)")
    args = p.parse_args(argv)
    _worker(args.dsn, args.index, args.starts)
