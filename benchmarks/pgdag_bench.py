"""pgdag's side of the benchmark: workloads W1-W7 of issue 5 and W8 (map fan-out), on a
real Postgres.

Every workload gets a fresh database (created, migrated, dropped afterwards), runs real
``python -m workers`` processes (and ``python -m engine serve`` where HTTP is part of it),
and enqueues through the engine's own API (`engine.transitions.create_run`, the call
``POST /runs`` makes), with every guarantee on: fencing tokens, one audit row per
transition, NOTIFY per statement, synchronous_commit and fsync as the server has them.
"""

from __future__ import annotations

import asyncio
import json
import os
import statistics
import tempfile
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import psycopg

from benchmarks.common import (
    CostMeter,
    child_env,
    cpu_s,
    free_port,
    log_tail,
    parent_pid,
    percentile,
    postgres_cpu_s,
    processes,
    rss_mb,
    scratch_db,
    wait_until,
)
from engine.dag import RunSpec, parse_run
from engine.db import open_pool
from engine.sql import queries
from engine.store import Store
from engine.tools import load_tool_modules

TOOLS = "benchmarks.tools"
WORKER_CONCURRENCY = 256  # `--concurrency`: no-op steps need many slots to batch well


def _spec(steps: list[dict[str, Any]], goal: str = "bench") -> RunSpec:
    load_tool_modules(["workers.tools.builtin", TOOLS])
    return parse_run({"goal": goal, "steps": steps}, max_steps=1_000_000)


def enqueue(url: str, specs: list[RunSpec], *, connections: int = 4) -> tuple[list[str], float]:
    """Create every run in `specs` through `Store.create_run` over `connections`
    connections at once. Returns ``(run ids, seconds)``."""

    async def go() -> list[str]:
        pool = await open_pool(url, min_size=connections, max_size=connections)
        store = Store(pool, lease_ttl_s=30)
        sem = asyncio.Semaphore(connections)

        async def one(spec: RunSpec) -> str:
            async with sem:
                run_id, _ = await store.create_run(spec)
                return run_id

        try:
            return await asyncio.gather(*(one(s) for s in specs))
        finally:
            await pool.close()

    t0 = time.perf_counter()
    ids = asyncio.run(go())
    return ids, time.perf_counter() - t0


def _worker_argvs(n: int, concurrency: int) -> list[list[str]]:
    return [
        ["-m", "workers", "--concurrency", str(concurrency), "--worker-id", f"bench-{i}"]
        for i in range(n)
    ]


def _wait_workers_ready(conn: psycopg.Connection[Any], workers: int) -> None:
    """Wait until `workers` workers are registered as running and as many LISTEN connections
    are open on this database, so that process start-up is not part of what is timed."""
    wait_until(
        lambda: (
            conn.execute("SELECT count(*) FROM workers WHERE status = 'running'").fetchone()[0]  # type: ignore[index]
            >= workers
        ),
        timeout_s=30,
        what=f"{workers} worker(s) to register",
    )
    wait_until(
        lambda: (
            conn.execute(
                "SELECT count(*) FROM pg_stat_activity"
                " WHERE query = 'LISTEN pgdag_ready' AND datname = current_database()"
            ).fetchone()[0]  # type: ignore[index]
            >= workers
        ),
        timeout_s=30,
        what="the workers' LISTEN connections",
    )


def _unfinished_runs(conn: psycopg.Connection[Any]) -> int:
    row = conn.execute(
        "SELECT count(*) FROM runs WHERE status IN ('pending', 'running')"
    ).fetchone()
    return int(row[0]) if row else 0


def _drain(
    url: str,
    *,
    jobs: int,
    workers: int,
    concurrency: int,
    timeout_s: float,
    api: bool = False,
) -> dict[str, Any]:
    """Start `workers` worker processes (and an idle API when `api`), wait until no run is
    unfinished, and time it two ways: wall clock from spawning the processes, and the
    database's own clock from the first claim to the last success (no process start-up).
    ``cost``: the WAL bytes and commits the drain cost, over `jobs` (`CostMeter`: from
    before the processes start to after they have exited, so their start-up and shutdown
    are in it)."""
    argvs = _worker_argvs(workers, concurrency)
    port = free_port()
    if api:
        argvs.append(["-m", "engine", "serve", "--port", str(port)])
    env = child_env(url, PGDAG_TOOLS=TOOLS)
    meter = CostMeter(url)
    meter.before()
    polls = 0  # queries of our own monitoring connection: its commits are subtracted

    def finished(conn: psycopg.Connection[Any]) -> bool:
        nonlocal polls
        polls += 1
        return _unfinished_runs(conn) == 0

    def registered(conn: psycopg.Connection[Any]) -> bool:
        nonlocal polls
        polls += 1
        row = conn.execute("SELECT count(*) FROM workers WHERE status = 'running'").fetchone()
        return bool(row and row[0] >= workers)

    with processes(argvs, env) as procs, psycopg.connect(url, autocommit=True) as conn:
        t0 = time.perf_counter()
        # CPU from the moment the workers registered (their start-up left out) to the end.
        postmaster = parent_pid(int(conn.execute("SELECT pg_backend_pid()").fetchone()[0]))  # type: ignore[index]
        polls += 1
        wait_until(lambda: registered(conn), timeout_s=timeout_s, what="the workers to register")
        cpu0 = [cpu_s(p.pid) for p in procs], postgres_cpu_s(postmaster)
        wait_until(
            lambda: finished(conn),
            timeout_s=timeout_s,
            what="every run to finish",
            interval_s=0.01,
        )
        wall = time.perf_counter() - t0
        cpu1 = [cpu_s(p.pid) for p in procs], postgres_cpu_s(postmaster)
        worker_cpu = sum(cpu1[0][i] - cpu0[0][i] for i in range(workers))
        cpu_us = {
            "postgres": round((cpu1[1] - cpu0[1]) / jobs * 1e6),
            "workers": round(worker_cpu / jobs * 1e6),
            "api": round((cpu1[0][-1] - cpu0[0][-1]) / jobs * 1e6) if api else None,
        }
        rss = {
            "workerMb": [round(rss_mb(p.pid), 1) for p in procs[:workers]],
            "apiMb": round(rss_mb(procs[-1].pid), 1) if api else None,
            # CPU seconds since start (start-up included, ~0.5 s each)
            "workerCpuS": [round(cpu_s(p.pid), 2) for p in procs[:workers]],
            "apiCpuS": round(cpu_s(procs[-1].pid), 2) if api else None,
        }
        first, last = conn.execute(
            "SELECT min(created_at) FILTER (WHERE event = 'step_claimed'),"
            "       max(created_at) FILTER (WHERE event = 'step_succeeded')"
            " FROM audit_log"
        ).fetchone()  # type: ignore[misc]
        failed = conn.execute("SELECT count(*) FROM runs WHERE status <> 'completed'").fetchone()
        polls += 2
    return {
        "wallS": round(wall, 3),
        "dbS": round((last - first).total_seconds(), 3),
        "notCompleted": int(failed[0]) if failed else None,
        "rss": rss,
        # CPU microseconds per job, from the workers' registration to the last success
        "cpuUsPerJob": cpu_us,
        "cost": meter.after(jobs, monitor_commits=polls + 1),  # + its start-up
    }


def w1(base: str, jobs: int, *, shape: str = "runs", workers: int = 2) -> dict[str, Any]:
    """W1 flat: `jobs` independent NOOP steps, enqueued first, then drained by `workers`
    processes. `shape` "runs": one one-step run per job (every job also starts and
    finishes its run: five audit rows a job); "steps": runs of up to 10,000 independent
    steps (the default PGDAG_MAX_STEPS), two audit rows a step."""
    name = f"pgdag_bench_w1_{shape}"
    with scratch_db(base, name) as url:
        if shape == "runs":
            specs = [_spec([{"name": "job", "tool": "NOOP", "input": {}}])] * jobs
        else:
            per_run = min(jobs, 10_000)
            specs = [
                _spec([{"name": f"s{i}", "tool": "NOOP", "input": {}} for i in range(per_run)])
            ] * max(1, jobs // per_run)
        _, enqueue_s = enqueue(url, specs)
        d = _drain(
            url,
            jobs=jobs,
            workers=workers,
            concurrency=WORKER_CONCURRENCY,
            timeout_s=600,
            api=True,
        )
    return {
        "jobs": jobs,
        "shape": shape,
        "workers": workers,
        "concurrency": WORKER_CONCURRENCY,
        "enqueueS": round(enqueue_s, 3),
        **d,
        "jobsPerS": round(jobs / d["wallS"]),
        "jobsPerSDb": round(jobs / d["dbS"]),
    }


def w9_agents(base: str, jobs: int, *, agents: int = 2) -> dict[str, Any]:
    """W9: W1's flat drain ("steps" shape) with `agents` remote agents instead of database
    workers: ``python -m workers --server`` processes with no DATABASE_URL in their
    environment, which claim, heartbeat and report through one API process over HTTP
    (``/agent/*``). Timed like W1: the database's clock from the first claim to the last
    success, and the wall clock from spawning the agents."""
    name = "pgdag_bench_w9"
    per_run = min(jobs, 10_000)
    specs = [_spec([{"name": f"s{i}", "tool": "NOOP", "input": {}} for i in range(per_run)])] * max(
        1, jobs // per_run
    )
    port = free_port()
    with (
        scratch_db(base, name) as url,
        tempfile.TemporaryDirectory(prefix="pgdag-w9-") as tmp,
        psycopg.connect(url, autocommit=True) as conn,
    ):
        api_env = child_env(url, PGDAG_TOOLS=TOOLS)
        agent_env = {k: v for k, v in api_env.items() if k != "DATABASE_URL"}
        with processes([["-m", "engine", "serve", "--port", str(port)]], api_env) as api:
            server = f"http://127.0.0.1:{port}"
            wait_until(
                lambda: _healthy(server),
                timeout_s=60,
                what="the API to answer /health",
            )
            _, enqueue_s = enqueue(url, specs)
            argvs = [
                [
                    "-m",
                    "workers",
                    "--server",
                    server,
                    "--concurrency",
                    str(WORKER_CONCURRENCY),
                    "--worker-id",
                    f"bench-agent-{i}",
                    "--agent-log",
                    str(Path(tmp) / f"agent-{i}.sqlite3"),
                ]
                for i in range(agents)
            ]
            postmaster = parent_pid(int(conn.execute("SELECT pg_backend_pid()").fetchone()[0]))  # type: ignore[index]
            with processes(argvs, agent_env, log_dir=Path(tmp) / "logs") as procs:
                t0 = time.perf_counter()
                everyone = [*procs, api[0]]
                try:
                    # CPU from the agents' registration (their start-up left out) to the end.
                    wait_until(
                        lambda: (
                            conn.execute(
                                "SELECT count(*) FROM workers WHERE status = 'running'"
                            ).fetchone()[0]  # type: ignore[index]
                            >= agents
                        ),
                        timeout_s=60,
                        what="the agents to register",
                    )
                    cpu0 = [cpu_s(p.pid) for p in everyone], postgres_cpu_s(postmaster)
                    wait_until(
                        lambda: _unfinished_runs(conn) == 0,
                        timeout_s=600,
                        what="every run to finish",
                        interval_s=0.01,
                    )
                except TimeoutError:
                    raise RuntimeError(log_tail(Path(tmp) / "logs")) from None
                wall = time.perf_counter() - t0
                cpu1 = [cpu_s(p.pid) for p in everyone], postgres_cpu_s(postmaster)
                cpu_us = {
                    "postgres": round((cpu1[1] - cpu0[1]) / jobs * 1e6),
                    "agents": round(
                        sum(cpu1[0][i] - cpu0[0][i] for i in range(agents)) / jobs * 1e6
                    ),
                    "api": round((cpu1[0][-1] - cpu0[0][-1]) / jobs * 1e6),
                }
                rss = {
                    "agentMb": [round(rss_mb(p.pid), 1) for p in procs],
                    "apiMb": round(rss_mb(api[0].pid), 1),
                }
        first, last = conn.execute(
            "SELECT min(created_at) FILTER (WHERE event = 'step_claimed'),"
            "       max(created_at) FILTER (WHERE event = 'step_succeeded')"
            " FROM audit_log"
        ).fetchone()  # type: ignore[misc]
        row = conn.execute("SELECT count(*) FROM runs WHERE status <> 'completed'").fetchone()
        db_s = (last - first).total_seconds()
    return {
        "jobs": jobs,
        "agents": agents,
        "concurrency": WORKER_CONCURRENCY,
        "enqueueS": round(enqueue_s, 3),
        "wallS": round(wall, 3),
        "dbS": round(db_s, 3),
        "notCompleted": int(row[0]) if row else None,
        "rss": rss,
        # CPU microseconds per job, from the agents' registration to the last success
        "cpuUsPerJob": cpu_us,
        "jobsPerS": round(jobs / wall),
        "jobsPerSDb": round(jobs / db_s),
    }


def _healthy(server: str) -> bool:
    try:
        return httpx.get(f"{server}/health", timeout=2).status_code == 200
    except httpx.TransportError:
        return False


def diamond_chain(length: int = 10) -> list[dict[str, Any]]:
    """A chain of diamonds, `length` steps: a -> (b, c) -> d -> (e, f) -> g -> ... ."""
    steps: list[dict[str, Any]] = [{"name": "s0", "tool": "NOOP", "input": {}}]
    joins = ["s0"]
    i = 1
    while i < length:
        if length - i >= 3:
            left, right, join = f"s{i}", f"s{i + 1}", f"s{i + 2}"
            steps += [
                {"name": left, "tool": "NOOP", "input": {}, "dependsOn": [joins[-1]]},
                {"name": right, "tool": "NOOP", "input": {}, "dependsOn": [joins[-1]]},
                {"name": join, "tool": "NOOP", "input": {}, "dependsOn": [left, right]},
            ]
            joins.append(join)
            i += 3
        else:
            steps.append(
                {"name": f"s{i}", "tool": "NOOP", "input": {}, "dependsOn": [steps[-1]["name"]]}
            )
            i += 1
    return steps


def w2(base: str, runs: int, *, workers: int = 2) -> dict[str, Any]:
    """W2 DAG: `runs` runs of a 10-step diamond chain, enqueued first, then drained."""
    with scratch_db(base, "pgdag_bench_w2") as url:
        spec = _spec(diamond_chain(10))
        _, enqueue_s = enqueue(url, [spec] * runs)
        d = _drain(
            url, jobs=runs * 10, workers=workers, concurrency=WORKER_CONCURRENCY, timeout_s=600
        )
    steps = runs * 10
    return {
        "runs": runs,
        "steps": steps,
        "workers": workers,
        "enqueueS": round(enqueue_s, 3),
        **d,
        "stepsPerS": round(steps / d["wallS"]),
        "runsPerS": round(runs / d["wallS"]),
        "stepsPerSDb": round(steps / d["dbS"]),
        "runsPerSDb": round(runs / d["dbS"]),
    }


def w3(base: str, jobs: int, rate_per_s: float) -> dict[str, Any]:
    """W3 pickup latency at idle: one worker waits (LISTEN + poll); one-step STAMP runs are
    submitted `rate_per_s` a second. Latency = the tool's `time.time_ns()` at start minus
    `time.time_ns()` right after the submitting transaction's COMMIT returned."""
    with scratch_db(base, "pgdag_bench_w3") as url:
        spec = _spec([{"name": "stamp", "tool": "STAMP", "input": {}}])
        env = child_env(url, PGDAG_TOOLS=TOOLS)
        with (
            processes(_worker_argvs(1, 8), env),
            psycopg.connect(url, autocommit=True) as conn,
        ):
            _wait_workers_ready(conn, 1)
            committed: dict[str, int] = {}
            steps_json = spec.steps_json()
            interval = 1 / rate_per_s
            next_at = time.perf_counter()
            for _ in range(jobs):
                next_at += interval
                with conn.transaction():
                    run_id = str(
                        conn.execute(
                            queries["insert_run"],
                            {
                                "goal": "w3",
                                "idempotency_key": None,
                                "idempotency_fingerprint": None,
                                "steps_total": 1,
                                "priority": 0,
                                "start_at": None,
                                "trace_context": None,
                            },
                        ).fetchone()[0]  # type: ignore[index]
                    )
                    conn.execute(
                        queries["insert_steps"],
                        {"run_id": run_id, "steps": steps_json, "priority": 0, "start_at": None},
                    )
                committed[run_id] = time.time_ns()
                pause = next_at - time.perf_counter()
                if pause > 0:
                    time.sleep(pause)
            wait_until(
                lambda: conn.execute(
                    "SELECT count(*) = %s FROM steps WHERE status = 'succeeded'", (jobs,)
                ).fetchone()[0],  # type: ignore[index]
                timeout_s=60,
                what="every STAMP step to finish",
            )
            rows = conn.execute("SELECT run_id, output FROM steps").fetchall()
    lat = [(out["startedNs"] - committed[str(rid)]) / 1e6 for rid, out in rows]
    return {
        "n": jobs,
        "ratePerS": rate_per_s,
        "p50Ms": round(percentile(lat, 0.5), 2),
        "p99Ms": round(percentile(lat, 0.99), 2),
        "maxMs": round(max(lat), 2),
    }


def _insert_backlog(url: str, ready: int, per_run: int = 10_000) -> None:
    """`ready` ready NOOP steps in runs of `per_run` (the default PGDAG_MAX_STEPS), straight
    in SQL (setup, not measured). Ids run in order within a run, as a submit makes them, so
    a claim batch spans one run whatever the backlog: W4 then compares backlog sizes, not
    how many runs a batch touches (each run in a batch costs a counter update and a NOTIFY)."""
    runs = max(1, ready // per_run)
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO runs (goal, status, steps_total, steps_unfinished)"
            " SELECT 'backlog', 'pending', %s, %s FROM generate_series(1, %s)",
            (per_run, per_run, runs),
        )
        conn.execute(
            """
            INSERT INTO steps (run_id, name, tool, input, deps_remaining, status, max_attempts)
            SELECT r.id, 's' || g, 'NOOP', '{}', 0, 'ready', 3
            FROM runs r, generate_series(1, %s) g
            ORDER BY r.seq, g
            """,
            (per_run,),
        )
        conn.execute("VACUUM ANALYZE")


def w4(base: str, backlogs: tuple[int, ...], measured: int) -> dict[str, Any]:
    """W4 backlog: claim-and-complete rate over the first `measured` steps with each
    backlog of ready steps in the table (database clock, first claim to `measured`-th
    success)."""
    out: dict[str, Any] = {"measured": measured, "rates": {}}
    for backlog in backlogs:
        with scratch_db(base, f"pgdag_bench_w4_{backlog}") as url:
            _insert_backlog(url, backlog)
            env = child_env(url, PGDAG_TOOLS=TOOLS)
            argvs = _worker_argvs(2, WORKER_CONCURRENCY)
            with processes(argvs, env), psycopg.connect(url, autocommit=True) as conn:
                wait_until(
                    lambda: conn.execute(
                        "SELECT count(*) >= %s FROM audit_log WHERE event = 'step_succeeded'",
                        (measured,),
                    ).fetchone()[0],  # type: ignore[index]
                    timeout_s=600,
                    what=f"{measured} successes",
                    interval_s=0.05,
                )
            with psycopg.connect(url) as conn:
                first, nth = conn.execute(
                    """
                    SELECT (SELECT min(created_at) FROM audit_log WHERE event = 'step_claimed'),
                           (SELECT created_at FROM audit_log WHERE event = 'step_succeeded'
                            ORDER BY created_at OFFSET %s - 1 LIMIT 1)
                    """,
                    (measured,),
                ).fetchone()  # type: ignore[misc]
        out["rates"][str(backlog)] = round(measured / (nth - first).total_seconds())
    rates = list(out["rates"].values())
    out["ratio"] = round(rates[-1] / rates[0], 3) if len(rates) > 1 else None
    return out


def w5(base: str, steps: int, repeats: int) -> dict[str, Any]:
    """W5 big run: wall time of one ``POST /runs`` of a `steps`-step fan-out run against a
    real ``engine serve`` (median of `repeats`; each creates a new run)."""
    port = free_port()
    with scratch_db(base, "pgdag_bench_w5") as url:
        env = child_env(url, PGDAG_MAX_STEPS=str(max(steps, 10_000)))
        with processes([["-m", "engine", "serve", "--port", str(port)]], env):
            api = f"http://127.0.0.1:{port}"

            def healthy() -> bool:
                try:
                    return httpx.get(f"{api}/health").status_code == 200
                except httpx.TransportError:
                    return False

            wait_until(healthy, timeout_s=30, what="the API to answer")
            body = json.dumps(
                {
                    "goal": "w5",
                    "steps": [{"name": "root", "tool": "DELAY", "input": {"ms": 0}}]
                    + [
                        {
                            "name": f"s{i}",
                            "tool": "DELAY",
                            "input": {"ms": 0},
                            "dependsOn": ["root"],
                        }
                        for i in range(steps - 1)
                    ],
                }
            ).encode()
            times = []
            with httpx.Client(timeout=120) as client:
                for _ in range(repeats):
                    t0 = time.perf_counter()
                    r = client.post(
                        f"{api}/runs", content=body, headers={"content-type": "application/json"}
                    )
                    times.append(time.perf_counter() - t0)
                    r.raise_for_status()
    return {
        "steps": steps,
        "bodyBytes": len(body),
        "medianMs": round(percentile(times, 0.5) * 1000),
        "allMs": [round(t * 1000) for t in times],
    }


def _sizes(
    conn: psycopg.Connection[Any],
    tables: tuple[str, ...] = ("steps", "audit_log", "runs", "step_edges"),
) -> dict[str, Any]:
    """Size and statistics of each of `tables`; a partitioned table (audit_log) is the sum
    of its partitions."""
    rows = conn.execute(
        """
        WITH rels AS (
            SELECT c.oid, coalesce(p.relname, c.relname) AS root
            FROM pg_class c
            LEFT JOIN pg_inherits i ON i.inhrelid = c.oid
            LEFT JOIN pg_class p ON p.oid = i.inhparent
            WHERE c.relkind = 'r' AND coalesce(p.relname, c.relname) = ANY(%s)
        )
        SELECT r.root, sum(pg_table_size(r.oid))::bigint, sum(pg_indexes_size(r.oid))::bigint,
               sum(s.n_live_tup)::bigint, sum(s.n_dead_tup)::bigint,
               sum(s.autovacuum_count)::bigint, sum(s.n_tup_hot_upd)::bigint,
               sum(s.n_tup_upd)::bigint, count(*)::integer
        FROM rels r JOIN pg_stat_user_tables s ON s.relid = r.oid
        GROUP BY r.root
        ORDER BY r.root
        """,
        (list(tables),),
    ).fetchall()
    return {
        r[0]: {
            "tableMb": round(r[1] / 2**20, 1),
            "indexesMb": round(r[2] / 2**20, 1),
            "live": r[3],
            "dead": r[4],
            "autovacuums": r[5],
            "hotUpdatePct": round(100 * r[6] / r[7], 1) if r[7] else 0.0,
            "relations": r[8],
        }
        for r in rows
    }


RESET_TABLE_SETTINGS = """
ALTER TABLE runs RESET (fillfactor, autovacuum_vacuum_scale_factor);
ALTER TABLE steps RESET (autovacuum_vacuum_scale_factor, autovacuum_analyze_scale_factor)
"""  # audit_log is partitioned (migration 0007): it has no settings to reset


def w6(
    base: str,
    total: int,
    *,
    per_run: int = 1000,
    window: int = 20,
    table_settings: bool = True,
) -> dict[str, Any]:
    """W6 churn: `total` NOOP steps (runs of `per_run`) go through 2 workers, submitted as
    the table drains (at most `window` runs unfinished), with the server's autovacuum and
    the migrations' table settings (or, with `table_settings` False, those reset to
    Postgres's defaults). Reports sizes and dead tuples at the end."""
    spec = _spec([{"name": f"s{i}", "tool": "NOOP", "input": {}} for i in range(per_run)])
    runs = max(1, total // per_run)
    with scratch_db(base, "pgdag_bench_w6") as url:
        if not table_settings:
            with psycopg.connect(url, autocommit=True) as conn:
                conn.execute(RESET_TABLE_SETTINGS)
        env = child_env(url, PGDAG_TOOLS=TOOLS)
        t0 = time.perf_counter()
        with (
            processes(_worker_argvs(2, WORKER_CONCURRENCY), env),
            psycopg.connect(url, autocommit=True) as conn,
        ):
            submitted = 0
            while submitted < runs:
                room = window - _unfinished_runs(conn)
                if room > 0:
                    batch = min(room, runs - submitted)
                    enqueue(url, [spec] * batch, connections=2)
                    submitted += batch
                else:
                    time.sleep(0.05)
            wait_until(
                lambda: _unfinished_runs(conn) == 0,
                timeout_s=600,
                what="the churn to finish",
                interval_s=0.05,
            )
            wall = time.perf_counter() - t0
            conn.execute("SELECT pg_stat_force_next_flush()")
            time.sleep(1.0)  # statistics are flushed at most once a second
            sizes = _sizes(conn)
        with psycopg.connect(url, autocommit=True) as conn:
            pruning = _retention_phase(conn)
    return {
        "steps": runs * per_run,
        "tableSettings": "migrations" if table_settings else "postgres defaults",
        "seconds": round(wall, 1),
        "stepsPerS": round(runs * per_run / wall),
        "tables": sizes,
        "retention": pruning,
    }


# The audit log as it was before migration 0007: one plain table, pruned by DELETE.
PLAIN_AUDIT = """
CREATE TABLE audit_plain (
    id bigint PRIMARY KEY, run_id uuid NOT NULL, step_id bigint, step_name text,
    event text NOT NULL, from_status text, to_status text, attempt integer,
    lease_token bigint, worker_id text, detail jsonb,
    created_at timestamptz NOT NULL DEFAULT now()
) WITH (autovacuum_vacuum_insert_threshold = 100000,
        autovacuum_vacuum_insert_scale_factor = 0);
CREATE INDEX audit_plain_run_idx ON audit_plain (run_id, id);
INSERT INTO audit_plain SELECT * FROM audit_log;
"""
# prune_finished_runs' audit DELETE before migration 0007, a batch of (up to) 100 runs.
PLAIN_DELETE_BATCH = """
WITH old AS (
    SELECT r.id FROM runs r
    WHERE r.status IN ('completed', 'failed', 'cancelled') AND r.seq > %(after)s
    ORDER BY r.seq LIMIT 100
), gone AS (
    DELETE FROM audit_plain a USING old WHERE a.run_id = old.id
)
SELECT max(r.seq) FROM runs r JOIN old ON old.id = r.id
"""


def _flushed_sizes(conn: psycopg.Connection[Any], table: str) -> dict[str, Any]:
    conn.execute("SELECT pg_stat_force_next_flush()")
    time.sleep(1.0)  # the statistics of this backend reach the views at most once a second
    return dict(_sizes(conn, (table,)).get(table, {}))


def _retention_phase(conn: psycopg.Connection[Any]) -> dict[str, Any]:
    """Prune every audit row the churn wrote, two ways on the same rows, one after the
    other: "delete" (before migration 0007: `PLAIN_DELETE_BATCH` on a plain copy, batches
    of 100 runs as the pruner did) and "partitions" (the upkeep drops today's partition,
    `engine.retention`'s query with a cut-off a day ahead). Each side starts vacuumed and
    analyzed; reports seconds, size and dead tuples after, and for "delete" the VACUUM that
    the dead tuples then cost. Runs and steps are deleted the same way by both: not timed."""
    conn.execute(PLAIN_AUDIT)
    conn.execute("VACUUM ANALYZE audit_plain")
    conn.execute("VACUUM ANALYZE audit_log")
    events = conn.execute("SELECT count(*) FROM audit_plain").fetchone()
    out: dict[str, Any] = {"events": events[0] if events else 0}

    before = _flushed_sizes(conn, "audit_plain")
    t0 = time.perf_counter()
    after_seq = 0
    while True:
        row = conn.execute(PLAIN_DELETE_BATCH, {"after": after_seq}).fetchone()
        if row is None or row[0] is None:
            break
        after_seq = row[0]
    seconds = time.perf_counter() - t0
    sizes = _flushed_sizes(conn, "audit_plain")
    t0 = time.perf_counter()
    conn.execute("VACUUM audit_plain")
    vacuum_s = time.perf_counter() - t0
    out["delete"] = {"before": before, "seconds": round(seconds, 3), "after": sizes,
                     "vacuumSeconds": round(vacuum_s, 3)}  # fmt: skip
    conn.execute("DROP TABLE audit_plain")

    before = _flushed_sizes(conn, "audit_log")
    t0 = time.perf_counter()
    done = conn.execute(
        queries["maintain_audit_partitions"],
        {"retention_s": -86400.0, "ahead_days": 0, "lock_timeout_ms": 60_000},
    ).fetchall()
    seconds = time.perf_counter() - t0
    out["partitions"] = {
        "before": before,
        "seconds": round(seconds, 3),
        "after": _flushed_sizes(conn, "audit_log"),
        "vacuumSeconds": 0.0,
        "dropped": [r[1] for r in done if r[0] == "dropped"],
    }
    return out


FINISHED = ("completed", "failed", "cancelled")


def map_steps(children: int) -> list[dict[str, Any]]:
    """W8's run: ``list`` emits ``[0 .. children-1]``, the map step ``each`` fans out one
    NOOP child per element, ``join`` depends on ``each`` (so on every child)."""
    return [
        {"name": "list", "tool": "BENCH_EMIT_LIST", "input": {"n": children}},
        {
            "name": "each",
            "tool": "NOOP",
            "input": {},
            "map": {"$ref": "steps.list.output.items"},
            "dependsOn": ["list"],
        },
        {"name": "join", "tool": "NOOP", "input": {}, "dependsOn": ["each"]},
    ]


def _seconds(a: datetime | None, b: datetime | None) -> float | None:
    return None if a is None or b is None else round((b - a).total_seconds(), 3)


def _map_run_figures(conn: psycopg.Connection[Any], run_id: str, children: int) -> dict[str, Any]:
    """One finished W8 run: its timings on the database clock, from the run's `created_at`
    (the submit's transaction), and whether the map output is what the children returned,
    in order."""
    row = conn.execute(
        """
        SELECT r.status, r.created_at, l.started_at, l.output,
               (SELECT a.created_at FROM audit_log a
                WHERE a.run_id = r.id AND a.step_id = e.id AND a.event = 'step_map_expanded'
                ORDER BY a.id LIMIT 1),
               (SELECT max(c.finished_at) FROM steps c WHERE c.map_parent_id = e.id),
               e.id, e.map_width, e.finished_at, e.output, j.started_at, j.status
        FROM runs r
        JOIN steps l ON l.run_id = r.id AND l.name = 'list'
        JOIN steps e ON e.run_id = r.id AND e.name = 'each'
        JOIN steps j ON j.run_id = r.id AND j.name = 'join'
        WHERE r.id = %s
        """,
        (run_id,),
    ).fetchone()
    assert row is not None, run_id
    (
        run_status,
        created,
        list_started,
        list_output,
        expanded,
        children_done,
        each_id,
        width,
        each_finished,
        each_output,
        join_started,
        join_status,
    ) = row
    kids = conn.execute(
        "SELECT name, map_index, map_item, status, output FROM steps"
        " WHERE map_parent_id = %s ORDER BY map_index",
        (each_id,),
    ).fetchall()
    problems = []
    if run_status != "completed" or join_status != "succeeded":
        problems.append(f"run {run_status}, join {join_status}")
    if list_output != {"items": list(range(children))}:
        problems.append("list's output is not [0 .. n-1]")
    if width != children or len(kids) != children:
        problems.append(f"map width {width}, {len(kids)} children, expected {children}")
    if not isinstance(each_output, list):
        problems.append(f"each's output is {type(each_output).__name__}, not a JSON array")
    elif len(each_output) != children:
        problems.append(f"each's output has {len(each_output)} elements, expected {children}")
    else:
        for i, (name, index, item, status, output) in enumerate(kids):
            if (name, index, item, status) != (f"each[{i}]", i, i, "succeeded"):
                problems.append(f"child {i} is {(name, index, item, status)}")
                break
            if each_output[i] != output:
                problems.append(f"each's output[{i}] is not child {name}'s output")
                break
    if join_started is None:
        problems.append("join never started")
    elif children_done is None or each_finished is None or join_started < each_finished:
        problems.append("join started before the map step joined")
    expand_s = _seconds(created, expanded)
    join_s = _seconds(created, join_started)
    children_s = _seconds(expanded, children_done)
    return {
        "runId": run_id,
        "joinStartS": join_s,
        "listStartS": _seconds(created, list_started),
        "expandS": expand_s,
        "childrenDoneS": _seconds(created, children_done),
        "mapJoinedS": _seconds(created, each_finished),
        "childrenPerS": round(children / children_s) if children_s else None,
        "outputLength": len(each_output) if isinstance(each_output, list) else None,
        "outputOk": not problems,
        "problems": problems,
    }


def w8_map(
    base: str, children: int, repeats: int = 3, *, workers: int = 2, timeout_s: float = 300
) -> dict[str, Any]:
    """W8 map fan-out: a run whose map step fans out into `children` NOOP children, then a
    join step, with `workers` worker processes already registered and listening. Time from
    the run's `created_at` to the join step's `started_at` (database clock); `repeats` runs
    one after the other (each once the one before it has completed) in one database with the
    same workers; median and every value. Also: the map's expansion time (its
    ``step_map_expanded`` audit row), children/s from expansion to the last child's success,
    and a check that the map step's output is the children's outputs, `children` long, in
    order."""
    spec = _spec(map_steps(children), goal="w8 map")
    load_before = os.getloadavg()
    runs: list[dict[str, Any]] = []
    with (
        scratch_db(base, "pgdag_bench_w8") as url,
        tempfile.TemporaryDirectory(prefix="pgdag_w8_") as tmp,
    ):
        logs = Path(tmp)
        env = child_env(url, PGDAG_TOOLS=TOOLS, PGDAG_MAX_MAP_WIDTH=str(max(children, 10_000)))
        argvs = _worker_argvs(workers, WORKER_CONCURRENCY)
        with (
            processes(argvs, env, log_dir=logs) as procs,
            psycopg.connect(url, autocommit=True) as conn,
        ):
            _wait_workers_ready(conn, workers)
            for _ in range(repeats):
                (run_id,), _ = enqueue(url, [spec], connections=1)

                def run_state(run_id: str = run_id) -> tuple[Any, ...]:
                    dead = [p.pid for p in procs if p.poll() is not None]
                    if dead:
                        raise RuntimeError(
                            f"benchmark w8: worker process(es) {dead} exited\n{log_tail(logs)}"
                        )
                    row = conn.execute(
                        "SELECT r.status, j.started_at FROM runs r"
                        " JOIN steps j ON j.run_id = r.id AND j.name = 'join'"
                        " WHERE r.id = %s",
                        (run_id,),
                    ).fetchone()
                    assert row is not None
                    return tuple(row)

                try:
                    wait_until(  # (or the run to end without it: a failed map)
                        lambda: run_state()[1] is not None or run_state()[0] in FINISHED,
                        timeout_s=timeout_s,
                        what="the join step to start",
                        interval_s=0.01,
                    )
                    wait_until(
                        lambda: run_state()[0] in FINISHED,
                        timeout_s=60,
                        what="the run to finish",
                        interval_s=0.01,
                    )
                except TimeoutError as exc:
                    counts = conn.execute(
                        "SELECT name ~ '^each\\[' AS child, status, count(*) FROM steps"
                        " WHERE run_id = %s GROUP BY 1, 2 ORDER BY 1, 2",
                        (run_id,),
                    ).fetchall()
                    raise TimeoutError(
                        f"{exc}\nrun {run_id} steps (child?, status, count): {counts}\n"
                        f"{log_tail(logs)}"
                    ) from None
                runs.append(_map_run_figures(conn, run_id, children))
    load_after = os.getloadavg()

    def med(key: str) -> float | None:
        values = [r[key] for r in runs if r[key] is not None]
        return round(statistics.median(values), 3) if values else None

    return {
        "children": children,
        "workers": workers,
        "concurrency": WORKER_CONCURRENCY,
        "repeats": repeats,
        "joinStartS": med("joinStartS"),
        "joinStartAllS": [r["joinStartS"] for r in runs],
        "expandS": med("expandS"),
        "expandAllS": [r["expandS"] for r in runs],
        "childrenPerS": med("childrenPerS"),
        "childrenPerSAll": [r["childrenPerS"] for r in runs],
        "outputLength": min((r["outputLength"] or 0) for r in runs) if runs else None,
        "outputOk": bool(runs) and all(r["outputOk"] for r in runs),
        "loadAvg": {"before": list(load_before), "after": list(load_after)},
        "runs": runs,
    }
