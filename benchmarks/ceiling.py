"""The physical ceiling of W1: a bare queue table drained the cheapest correct way.

No engine, no audit log, no leases, no NOTIFY: one table ::

    CREATE TABLE q (id bigserial PRIMARY KEY, status text NOT NULL, payload jsonb,
                    claimed_at timestamptz, done_at timestamptz)
    CREATE INDEX q_ready ON q (id) WHERE status = 'ready'

holding W1's jobs, drained by `PROCESSES` processes (like W1 and PgQueuer's W1), each
with `CONNECTIONS_PER_PROCESS` asyncio tasks on connections of their own (PgQueuer's
drain runs 2 consumers per process). Each task loops over two round trips per batch, each
its own committed transaction (synchronous_commit as the server has it):

1. claim: ``UPDATE q SET status = 'running' ... WHERE id IN (SELECT id ... FOR UPDATE SKIP
   LOCKED LIMIT n) RETURNING id``;
2. complete: ``UPDATE q SET status = 'done' ... WHERE id = ANY(ids)``.

Timed like pgdag's W1, on the database's clock: the first ``claimed_at`` to the last
``done_at`` (both ``now()``, the start of their transactions). Whatever pgdag adds on top
of this (audit rows, leases, fencing, run counters, notifications) is the price of its
guarantees; W1 / this rate says how much of the machine's queue throughput pgdag keeps.
"""

from __future__ import annotations

import asyncio
import multiprocessing as mp
import time
from multiprocessing.connection import Connection
from typing import Any

import psycopg

from benchmarks.common import CostMeter, scratch_db

PROCESSES = 2
CONNECTIONS_PER_PROCESS = 2
DB_NAME = "pgdag_bench_ceiling"
READY_TIMEOUT_S = 60.0
DRAIN_TIMEOUT_S = 300.0

SCHEMA = (
    "CREATE TABLE q (id bigserial PRIMARY KEY, status text NOT NULL, payload jsonb,"
    " claimed_at timestamptz, done_at timestamptz)",
    "CREATE INDEX q_ready ON q (id) WHERE status = 'ready'",
)
CLAIM = (
    "UPDATE q SET status = 'running', claimed_at = now() WHERE id IN"
    " (SELECT id FROM q WHERE status = 'ready' ORDER BY id LIMIT %s FOR UPDATE SKIP LOCKED)"
    " RETURNING id"
)
COMPLETE = "UPDATE q SET status = 'done', done_at = now() WHERE id = ANY(%s)"


def _drainer(url: str, batch: int, connections: int, pipe: Connection) -> None:
    """Child process: open `connections` connections, say "ready", wait for "go", then
    claim and complete batches of `batch` on each until a claim comes back empty. Sends
    back the number of jobs it completed."""

    async def go() -> int:
        conns = [
            await psycopg.AsyncConnection.connect(url, autocommit=True) for _ in range(connections)
        ]
        try:
            # prepare both statements on every connection before the clock starts
            for c in conns:
                await c.execute(COMPLETE, ([],), prepare=True)
            pipe.send("ready")
            await asyncio.get_running_loop().run_in_executor(None, pipe.recv)

            async def loop(conn: psycopg.AsyncConnection[Any]) -> int:
                done = 0
                while True:
                    cur = await conn.execute(CLAIM, (batch,), prepare=True)
                    ids = [r[0] for r in await cur.fetchall()]
                    if not ids:
                        return done
                    await conn.execute(COMPLETE, (ids,), prepare=True)
                    done += len(ids)

            return sum(await asyncio.gather(*(loop(c) for c in conns)))
        finally:
            for c in conns:
                await c.close()

    pipe.send(asyncio.run(go()))


def _recv(pipe: Connection, timeout_s: float, what: str) -> Any:
    if not pipe.poll(timeout_s):
        raise RuntimeError(f"ceiling: no {what} within {timeout_s:.0f} s")
    return pipe.recv()


def drain(base: str, jobs: int, batch: int) -> dict[str, Any]:
    """`jobs` rows in a fresh bare queue table (scratch database `DB_NAME`), drained by
    `PROCESSES` processes x `CONNECTIONS_PER_PROCESS` connections claiming `batch` rows at
    a time. Returns ``jobsPerSDb`` (jobs / database-clock seconds from the first claim to
    the last completion), ``jobsPerS`` (wall clock from "go" to every process done), and
    ``cost`` (`CostMeter`: WAL bytes and commits of the drain). Raises RuntimeError if a
    process does not report in time or a job is left undone."""
    ctx = mp.get_context("spawn")
    with scratch_db(base, DB_NAME, migrate=False) as url:
        with psycopg.connect(url, autocommit=True) as conn:
            for ddl in SCHEMA:
                conn.execute(ddl)
            conn.execute(
                "INSERT INTO q (status, payload) SELECT 'ready', '{}' FROM generate_series(1, %s)",
                (jobs,),
            )
            conn.execute("VACUUM ANALYZE q")
        meter = CostMeter(url)
        meter.before()
        pipes, procs = [], []
        try:
            for _ in range(PROCESSES):
                mine, theirs = ctx.Pipe()
                proc = ctx.Process(
                    target=_drainer, args=(url, batch, CONNECTIONS_PER_PROCESS, theirs)
                )
                proc.start()
                pipes.append(mine)
                procs.append(proc)
            for pipe in pipes:
                if _recv(pipe, READY_TIMEOUT_S, "ready from a drainer") != "ready":
                    raise RuntimeError("ceiling: a drainer did not say ready")
            t0 = time.perf_counter()
            for pipe in pipes:
                pipe.send("go")
            counts = [_recv(pipe, DRAIN_TIMEOUT_S, "count from a drainer") for pipe in pipes]
            wall = time.perf_counter() - t0
            for proc in procs:
                proc.join(30)
        finally:
            for proc in procs:
                if proc.is_alive():
                    proc.kill()
                    proc.join()
        with psycopg.connect(url, autocommit=True) as conn:
            row = conn.execute(
                "SELECT min(claimed_at), max(done_at), count(*) FILTER (WHERE status <> 'done')"
                " FROM q"
            ).fetchone()
        assert row is not None
        first, last, undone = row
        if undone or sum(counts) != jobs:
            raise RuntimeError(f"ceiling: {undone} jobs not done, {sum(counts)} of {jobs} done")
        cost = meter.after(jobs, monitor_commits=2)  # the check above and its start-up
    db_s = (last - first).total_seconds()
    return {
        "jobs": jobs,
        "batch": batch,
        "processes": PROCESSES,
        "connectionsPerProcess": CONNECTIONS_PER_PROCESS,
        "wallS": round(wall, 3),
        "dbS": round(db_s, 3),
        "jobsPerS": round(jobs / wall),
        "jobsPerSDb": round(jobs / db_s),
        "cost": cost,
    }


def run(base: str, jobs: int, batches: tuple[int, ...]) -> dict[str, Any]:
    """`drain` once per batch size; ``best`` is the highest ``jobsPerSDb`` (the ceiling)."""
    out: dict[str, Any] = {"jobs": jobs, "batches": {}}
    for batch in batches:
        out["batches"][str(batch)] = drain(base, jobs, batch)
    out["best"] = max(r["jobsPerSDb"] for r in out["batches"].values())
    return out
