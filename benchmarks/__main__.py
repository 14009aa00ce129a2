"""``python -m benchmarks``: the engine's figures, measured on a real Postgres.

Workloads (all by default; pick with ``--only``):

- accept:  time for ``POST /runs`` to accept one N-step run (default 5,000) over HTTP;
- drain:   N independent DELAY(0) steps (default 10,000) drained by 2 worker processes,
           steps/s from the first claim to the run's completion;
- explain: EXPLAIN (ANALYZE, BUFFERS) of the claim query with 1,000,000 steps in the table.

Uses ``DATABASE_URL`` when set, else the embedded cluster under ``PGDAG_HOME``. Each
workload gets a fresh database (``pgdag_bench_<workload>``) that is dropped afterwards.
Prints a table and writes ``benchmarks/results.json``. ``--quick`` shrinks every size.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import psycopg
from psycopg import sql

from engine.config import Settings
from engine.db import resolve_database_url
from engine.migrate import upgrade_head
from engine.sql import queries

ROOT = Path(__file__).resolve().parent.parent


def _db_url(base: str, name: str) -> str:
    info = psycopg.conninfo.conninfo_to_dict(base)
    info["dbname"] = name
    return psycopg.conninfo.make_conninfo(**info)  # type: ignore[arg-type]


@contextmanager
def scratch_db(base: str, name: str) -> Iterator[str]:
    """A freshly created and migrated database, dropped on exit."""
    with psycopg.connect(base, autocommit=True) as conn:
        conn.execute(
            sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
        )
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    url = _db_url(base, name)
    upgrade_head(url)
    try:
        yield url
    finally:
        with psycopg.connect(base, autocommit=True) as conn:
            conn.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )


def _env(url: str) -> dict[str, str]:
    return {**os.environ, "DATABASE_URL": url, "PYTHONPATH": str(ROOT)}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@contextmanager
def processes(argvs: list[list[str]], url: str) -> Iterator[list[subprocess.Popen[bytes]]]:
    procs = [
        subprocess.Popen(
            [sys.executable, *argv],
            env=_env(url),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for argv in argvs
    ]
    try:
        yield procs
    finally:
        for p in procs:
            p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()


def _steps(n: int, *, fan_from_root: bool) -> list[dict[str, Any]]:
    if fan_from_root:
        return [{"name": "root", "tool": "DELAY", "input": {"ms": 0}}] + [
            {"name": f"s{i}", "tool": "DELAY", "input": {"ms": 0}, "dependsOn": ["root"]}
            for i in range(n - 1)
        ]
    return [{"name": f"s{i}", "tool": "DELAY", "input": {"ms": 0}} for i in range(n)]


def bench_accept(base: str, n: int, repeats: int) -> dict[str, Any]:
    """Time POST /runs of one n-step fan-out run against a real `engine serve`."""
    port = _free_port()
    with (
        scratch_db(base, "pgdag_bench_accept") as url,
        processes([["-m", "engine", "serve", "--port", str(port)]], url),
    ):
        api = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{api}/health").status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.1)
        body = json.dumps({"goal": "bench", "steps": _steps(n, fan_from_root=True)}).encode()
        times = []
        with httpx.Client(timeout=120) as client:
            for _ in range(repeats):
                t0 = time.perf_counter()
                r = client.post(
                    f"{api}/runs", content=body, headers={"content-type": "application/json"}
                )
                times.append(time.perf_counter() - t0)
                r.raise_for_status()
    times.sort()
    return {
        "steps": n,
        "bodyBytes": len(body),
        "medianMs": round(times[len(times) // 2] * 1000),
        "allMs": [round(t * 1000) for t in times],
    }


def bench_drain(base: str, n: int, workers: int, concurrency: int) -> dict[str, Any]:
    """n DELAY(0) steps enqueued, then drained by `workers` worker processes."""
    with scratch_db(base, "pgdag_bench_drain") as url:
        from tests.support import submit  # the same engine call the API makes

        run_id = submit(url, {"goal": "drain", "steps": _steps(n, fan_from_root=False)})
        argvs = [
            ["-m", "workers", "--concurrency", str(concurrency), "--worker-id", f"bench-{i}"]
            for i in range(workers)
        ]
        with processes(argvs, url), psycopg.connect(url, autocommit=True) as conn:
            deadline = time.monotonic() + 600
            while time.monotonic() < deadline:
                row = conn.execute("SELECT status FROM runs WHERE id = %s", (run_id,)).fetchone()
                if row and row[0] in ("completed", "failed", "cancelled"):
                    break
                time.sleep(0.05)
            first, last = conn.execute(
                "SELECT min(created_at), max(created_at) FROM audit_log"
                " WHERE run_id = %s AND event IN ('step_claimed', 'run_completed')",
                (run_id,),
            ).fetchone()  # type: ignore[misc]
    secs = (last - first).total_seconds()
    return {
        "steps": n,
        "workers": workers,
        "concurrency": concurrency,
        "status": row[0] if row else None,
        "seconds": round(secs, 2),
        "stepsPerSecond": round(n / secs),
    }


def bench_explain(base: str, n: int) -> dict[str, Any]:
    """EXPLAIN the claim query with n steps in the table, 1 % of them ready."""
    with (
        scratch_db(base, "pgdag_bench_explain") as url,
        psycopg.connect(url, autocommit=True) as conn,
    ):
        runs = max(1, n // 1000)
        conn.execute(
            "INSERT INTO runs (goal, status, steps_total, steps_unfinished)"
            " SELECT 'explain', 'running', 1000, 1000 FROM generate_series(1, %s)",
            (runs,),
        )
        conn.execute(
            """
            INSERT INTO steps (run_id, name, tool, input, deps_remaining, status, max_attempts,
                               available_at)
            SELECT r.id, 's' || g, 'DELAY', '{"ms":0}', 0,
                   CASE WHEN g % 100 = 0 THEN 'ready' ELSE 'succeeded' END, 3,
                   now() - interval '1 second'
            FROM (SELECT id, row_number() OVER () - 1 AS k FROM runs) r,
                 generate_series(r.k * 1000, r.k * 1000 + 999) g
            """
        )
        conn.execute("VACUUM ANALYZE steps")
        plans = {}
        with conn.transaction():
            for name, params in (
                ("claim_steps", {"worker_id": "explain", "limit": 50, "lease_ttl_s": 30}),
                ("reap_expired_leases", {"limit": 1000}),
            ):
                cur = conn.execute(
                    "EXPLAIN (ANALYZE, BUFFERS, COSTS OFF) " + queries[name],
                    params,  # type: ignore[operator]
                )
                plans[name] = [r[0] for r in cur.fetchall()]
            raise psycopg.Rollback()  # EXPLAIN ANALYZE ran the writes: undo them
        total = conn.execute("SELECT count(*) FROM steps").fetchone()[0]  # type: ignore[index]
    return {"steps": total, "plans": plans}


def machine(base: str) -> dict[str, Any]:
    with psycopg.connect(base) as conn:
        version = conn.execute("SHOW server_version").fetchone()[0]  # type: ignore[index]
        settings = {
            name: conn.execute(sql.SQL("SHOW {}").format(sql.Identifier(name))).fetchone()[0]  # type: ignore[index]
            for name in ("fsync", "synchronous_commit", "shared_buffers", "max_connections")
        }
    return {
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "postgres": version,
        "settings": settings,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--only", choices=["accept", "drain", "explain"], action="append")
    p.add_argument("--quick", action="store_true", help="small sizes: a smoke run")
    p.add_argument("--accept-steps", type=int, default=5000)
    p.add_argument("--drain-steps", type=int, default=10_000)
    p.add_argument("--explain-steps", type=int, default=1_000_000)
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results.json")
    args = p.parse_args(argv)
    if args.quick:
        args.accept_steps, args.drain_steps, args.explain_steps = 500, 1000, 20_000
    only = set(args.only or ["accept", "drain", "explain"])

    settings = Settings.from_env()
    base = resolve_database_url(settings)
    results: dict[str, Any] = {"machine": machine(base)}
    print(f"machine: {json.dumps(results['machine'])}", flush=True)
    if "accept" in only:
        r = results["accept"] = bench_accept(
            base, args.accept_steps, repeats=3 if args.quick else 5
        )
        print(
            f"accept   {r['steps']:>9,} steps in one POST /runs ({r['bodyBytes'] / 1e6:.2f} MB):"
            f" median {r['medianMs']} ms (all {r['allMs']})",
            flush=True,
        )
    if "drain" in only:
        r = results["drain"] = bench_drain(base, args.drain_steps, workers=2, concurrency=8)
        print(
            f"drain    {r['steps']:>9,} DELAY(0) steps, 2 worker processes x 8:"
            f" {r['seconds']} s, {r['stepsPerSecond']:,} steps/s ({r['status']})",
            flush=True,
        )
    if "explain" in only:
        r = results["explain"] = bench_explain(base, args.explain_steps)
        print(f"explain  {r['steps']:>9,} steps in the table, 1 % ready")
        for name, plan in r["plans"].items():
            print(f"--- {name}")
            print("\n".join(plan))
    args.out.write_text(json.dumps(results, indent=2, default=str))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
