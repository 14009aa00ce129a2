"""``python -m benchmarks``: pgdag beside PgQueuer, Procrastinate and DBOS, and beside the
raw commit rate of the same Postgres, measured in one run on one machine.

Workloads (all by default; pick with ``--only``, repeatable):

- w1:      flat: N independent no-op jobs enqueued, then drained by 2 worker processes;
- w2:      DAG: runs of a 10-step diamond chain (pgdag) / 3-step workflows (DBOS);
- w3:      pickup latency at idle, one job at a time: submit's commit -> the job starts;
- w4:      claim rate with 1,000,000 ready steps in the table versus 10,000;
- w5:      time to accept one 10,000-step run over HTTP;
- w6:      table and index size and dead tuples after N steps went through, then pruning
           the audit log: DELETE (the old way) beside dropping partitions;
- w7:      RSS of a worker and of the API after w1 (measured inside w1);
- w8:      map fan-out: one map step into 10,000 no-op children, submit -> the join starts;
- w9:      w1's drain by 2 remote agents (``python -m workers --server``, no DATABASE_URL)
           through one API process, beside w1;
- ceiling: W1's jobs in a bare queue table (no engine), drained by 2 processes with
           SKIP LOCKED claims and one completing UPDATE per batch (`benchmarks.ceiling`);
- ws:      live events to 1,000 WebSocket clients on ``/ws``: commit -> client latency and
           lost events, one frame per event and ``?batch=1`` (`benchmarks.ws_latency`);
- pgbench: single-row UPDATE commits/s at 8 and 16 clients (the ceiling);
- explain: EXPLAIN (ANALYZE, BUFFERS) of the claim and reaper queries and the maintenance look on
           1,000,000 steps.

Peers run when installed (``pip install -e ".[bench]"``), through their own APIs, in a
fresh database each. Uses ``DATABASE_URL`` when set, else the embedded cluster under
``PGDAG_HOME``; fsync and synchronous_commit stay as the server has them (on by default).
Prints a table and writes JSON (``--out``). ``--quick`` shrinks every size (~1 minute).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psycopg
from rich.console import Console
from rich.table import Table

from benchmarks import ceiling, pgbench, pgdag_bench, ws_latency
from benchmarks.common import ROOT, machine, scratch_db
from engine.config import Settings
from engine.db import resolve_database_url
from engine.sql import queries

WORKLOADS = (
    "w1",
    "w2",
    "w3",
    "w4",
    "w5",
    "w6",
    "w8",
    "w9",
    "ceiling",
    "ws",
    "pgbench",
    "peers",
    "explain",
)

FULL: dict[str, Any] = {
    "w1_jobs": 20_000,
    "w2_runs": 1_000,
    "w3_jobs": 300,
    "w3_rate": 100.0,
    "w4_backlogs": (10_000, 1_000_000),
    "w4_measured": 10_000,
    "w5_steps": 10_000,
    "w5_repeats": 3,
    "w6_steps": 1_000_000,
    "w8_children": 10_000,
    "w8_repeats": 3,
    "pgbench_seconds": 10,
    "explain_steps": 1_000_000,
    "dbos_workflows": 1_000,
    "ceiling_batches": (25, 100),
    "ws_clients": 1_000,
    "ws_rate": 200.0,
    "ws_seconds": 10.0,
    "ws_warmup_s": 3.0,
    "ws_modes": ("event", "batch"),
}
QUICK: dict[str, Any] = {
    "w1_jobs": 1_000,
    "w2_runs": 50,
    "w3_jobs": 30,
    "w3_rate": 100.0,
    "w4_backlogs": (2_000, 20_000),
    "w4_measured": 1_000,
    "w5_steps": 1_000,
    "w5_repeats": 2,
    "w6_steps": 5_000,
    "w8_children": 500,
    "w8_repeats": 3,
    "pgbench_seconds": 2,
    "explain_steps": 20_000,
    "dbos_workflows": 30,
    "ceiling_batches": (100,),
    "ws_clients": 50,
    "ws_rate": 200.0,
    "ws_seconds": 1.0,
    "ws_warmup_s": 1.0,
    "ws_modes": ("event",),
}


def bench_explain(base: str, n: int) -> dict[str, Any]:
    """EXPLAIN the claim and reaper queries with `n` steps in the table, 1 % ready."""
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
        # every ready step gets one pending child, so completions promote dependents
        conn.execute(
            """
            WITH parents AS (SELECT id, run_id, name FROM steps WHERE status = 'ready'),
            children AS (
                INSERT INTO steps (run_id, name, tool, input, depends_on, deps_remaining,
                                   status, max_attempts)
                SELECT run_id, name || '_child', 'DELAY', '{"ms":0}', ARRAY[name], 1,
                       'pending', 3
                FROM parents
                RETURNING id, run_id, depends_on[1] AS parent_name
            )
            INSERT INTO step_edges (parent_id, child_id)
            SELECT p.id, c.id FROM children c
            JOIN parents p ON p.run_id = c.run_id AND p.name = c.parent_name
            """
        )
        conn.execute("VACUUM ANALYZE")
        plans = {}
        explain = "EXPLAIN (ANALYZE, BUFFERS, COSTS OFF) "
        # The claim's walks of steps_ready_idx run inside pgdag_pick_ready (migration 0004),
        # which EXPLAIN shows as one Function Scan: auto_explain (a contrib module both the
        # wheel's and Debian's servers ship; LOAD needs a superuser, as the embedded
        # cluster's role is) sends the plans of the statements inside it as notices.
        nested: list[str] = []
        conn.add_notice_handler(
            lambda d: (
                nested.append(d.message_primary or "")
                if (d.message_primary or "").startswith("duration:")
                else None
            )
        )
        conn.execute("LOAD 'auto_explain'")
        for setting, value in (
            ("log_nested_statements", "on"),
            ("log_min_duration", "0"),
            ("log_analyze", "on"),
            ("log_buffers", "on"),
            ("log_level", "notice"),
        ):
            conn.execute(f"SET auto_explain.{setting} = {value}")
        with conn.transaction():
            cur = conn.execute(
                explain + queries["claim_steps"],
                {
                    "worker_id": "explain",
                    "limit": 50,
                    "lease_ttl_s": 30,
                    "tools": ["DELAY", "HTTP_GET_JSON"],
                },
            )
            plans["claim_steps"] = [r[0] for r in cur.fetchall()]
            conn.execute("SET auto_explain.log_min_duration = -1")
            plans["pgdag_pick_ready"] = [
                line for text in nested if "steps s" in text for line in text.splitlines()
            ]
            claimed = conn.execute(
                "SELECT id, lease_token FROM steps WHERE status = 'running'"
            ).fetchall()
            cur = conn.execute(
                explain + queries["complete_steps"],
                {
                    "ids": [r[0] for r in claimed],
                    "tokens": [r[1] for r in claimed],
                    "outputs": ["{}"] * len(claimed),
                    "worker_id": "explain",
                },
            )
            plans["complete_steps"] = [r[0] for r in cur.fetchall()]
            cur = conn.execute(explain + queries["reap_expired_leases"], {"limit": 1000})
            plans["reap_expired_leases"] = [r[0] for r in cur.fetchall()]
            # The maintenance leader's look before each round (every second), with 10,000
            # steps ready and nothing due for the reaper, the child runs or the scheduler.
            cur = conn.execute(explain + queries["maintenance_work_due"])
            plans["maintenance_work_due"] = [r[0] for r in cur.fetchall()]
            raise psycopg.Rollback()  # EXPLAIN ANALYZE ran the writes: undo them
        row = conn.execute("SELECT count(*) FROM steps").fetchone()
    return {"steps": row[0] if row else None, "plans": plans}


def _peer_calls(
    mod: Any, size: dict[str, Any]
) -> list[tuple[str, Callable[[str], dict[str, Any]]]]:
    """The workloads peer module `mod` runs: W1 and W3, and W2 where it has one."""

    def w1(url: str) -> dict[str, Any]:
        return mod.w1(url, size["w1_jobs"], 2)  # type: ignore[no-any-return]

    def w2(url: str) -> dict[str, Any]:
        return mod.w2(url, size["dbos_workflows"], 2)  # type: ignore[no-any-return]

    def w3(url: str) -> dict[str, Any]:
        return mod.w3(url, size["w3_jobs"], size["w3_rate"])  # type: ignore[no-any-return]

    calls: list[tuple[str, Callable[[str], dict[str, Any]]]] = [("w1", w1), ("w3", w3)]
    if hasattr(mod, "w2"):
        calls.append(("w2", w2))
    return calls


def run_peers(base: str, size: dict[str, Any]) -> dict[str, Any]:
    """W1 and W3 for each installed peer (and W2 for DBOS), each in a fresh database."""
    try:
        from benchmarks.peers import PEERS
    except ImportError as exc:
        return {"error": f"benchmarks.peers unavailable: {exc}"}
    out: dict[str, Any] = {}
    for name, mod in PEERS.items():
        why = mod.available()
        if why is not None:
            out[name] = {"skipped": why}
            print(f"  {name}: skipped ({why})", flush=True)
            continue
        res: dict[str, Any] = {"version": mod.VERSION, "config": mod.CONFIG}
        for workload, call in _peer_calls(mod, size):
            db = f"bench_peer_{name}_{workload}"
            try:
                with scratch_db(base, db, migrate=False) as url:
                    res[workload] = call(url)
            except Exception as exc:  # one peer failing must not lose the others' figures
                res[workload] = {"error": f"{type(exc).__name__}: {exc}"}
                traceback.print_exc()
            print(f"  {name} {workload}: {json.dumps(res[workload])}", flush=True)
        out[name] = res
    return out


def _fmt(value: Any, unit: str = "") -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:,.1f}{unit}"
    if isinstance(value, int):
        return f"{value:,}{unit}"
    return f"{value}{unit}"


def _peer(results: dict[str, Any], name: str, workload: str, key: str) -> Any:
    peer = results.get("peers", {}).get(name, {})
    if "skipped" in peer:
        return "n/a"
    entry = peer.get(workload)
    if entry is None:
        return None
    if "error" in entry:
        return "error"
    return entry.get(key)


def _w1_cell(results: dict[str, Any], name: str, jobs: int) -> str:
    """A peer's W1 rate, with its job count when the driver capped it below `jobs`."""
    rate = _peer(results, name, "w1", "jobsPerS")
    n = _peer(results, name, "w1", "jobs")
    if isinstance(n, int) and n != jobs:
        return f"{_fmt(rate)} ({n:,} jobs)"
    return _fmt(rate)


def _cost_cell(cost: Any, key: str, fmt: str) -> str:
    """One `CostMeter` figure of a W1 result's ``cost`` (or "n/a"/"error"/"-" as `_peer`)."""
    if isinstance(cost, dict):
        value = cost.get(key)
        return "-" if value is None else fmt.format(value)
    return _fmt(cost)


def _retention_rows(r: dict[str, Any]) -> list[tuple[str, str, str]]:
    """W6's retention phase, "delete" beside "partitions" (`pgdag_bench._retention_phase`)."""
    d, p = r["delete"], r["partitions"]

    def mb(s: dict[str, Any]) -> str:
        return f"{s.get('tableMb', 0) + s.get('indexesMb', 0):,.1f}"

    return [
        (
            "W6 retention",
            f"prune {r['events']:,} audit rows, delete / drop partitions: seconds",
            f"{d['seconds']:.3f} / {p['seconds']:.3f}",
        ),
        (
            "",
            "  audit table+indexes MB before -> after, delete / partitions",
            f"{mb(d['before'])} -> {mb(d['after'])} / {mb(p['before'])} -> {mb(p['after'])}",
        ),
        (
            "",
            "  dead tuples after, delete / partitions",
            f"{d['after'].get('dead', 0):,} / {p['after'].get('dead', 0):,}",
        ),
        ("", "  VACUUM the delete then needs: seconds", f"{d['vacuumSeconds']:.3f}"),
    ]


COLUMNS = ("workload", "figure", "pgdag", "PgQueuer", "Procrastinate", "DBOS")


def table(results: dict[str, Any]) -> Table:
    """The summary (`rows`) as a rich table."""
    t = Table(title="pgdag vs peers (same machine, same Postgres, one run)")
    for col in COLUMNS:
        t.add_column(col, justify="left" if col in ("workload", "figure") else "right")
    for row in rows(results):
        t.add_row(*row)
    return t


def rows(results: dict[str, Any]) -> list[list[str]]:
    """The summary: one row per figure, pgdag beside each peer (cells as in `COLUMNS`,
    trailing empty cells left out)."""
    out: list[list[str]] = []

    def add(*cells: str) -> None:
        out.append(list(cells))

    peers = ("pgqueuer", "procrastinate", "dbos")
    w1 = results.get("w1", {})
    if "steps" in w1:
        r = w1["steps"]
        add(
            "W1 flat",
            f"{r['jobs']:,} no-op jobs, 2 processes: jobs/s (pgdag: steps of 10,000-step runs)",
            _fmt(r["jobsPerSDb"]),
            *(_w1_cell(results, p, r["jobs"]) for p in peers),
        )
    if "runs" in w1:
        r = w1["runs"]
        add("", "  pgdag, each job a one-step run", _fmt(r["jobsPerSDb"]))
        add(
            "",
            "  pgdag wall clock incl. process start-up: steps / one-step runs",
            f"{_fmt(w1.get('steps', {}).get('jobsPerS'))} / {_fmt(r['jobsPerS'])}",
        )
    cost = w1.get("steps", {}).get("cost")
    if cost or "pgqueuer" in results.get("peers", {}):
        pgq = _peer(results, "pgqueuer", "w1", "cost")
        for key, label, fmt in (
            ("walBytesPerJob", "WAL bytes / job (cluster-wide: incl. API, autovacuum)", "{:,.0f}"),
            ("commitsPerJob", "commits / job (the drain's database)", "{:.2f}"),
        ):
            add(
                "W1 cost" if key == "walBytesPerJob" else "",
                f"  {label}",
                _cost_cell(cost, key, fmt),
                _cost_cell(pgq, key, fmt),
            )
    split = w1.get("steps", {}).get("cpuUsPerJob")
    pgq_split = _peer(results, "pgqueuer", "w1", "cpuUsPerJob")
    if not isinstance(pgq_split, dict):
        pgq_split = None
    if split or pgq_split:
        add(
            "",
            "  CPU us / job: Postgres / 2 workers / API (after start-up)",
            f"{split['postgres']} / {split['workers']} / {split['api']}" if split else "-",
            f"{pgq_split['postgres']} / {pgq_split['workers']} / -" if pgq_split else "-",
        )
    if "w9" in results:
        r = results["w9"]
        w1_rate = w1.get("steps", {}).get("jobsPerSDb")
        share = f" ({r['jobsPerSDb'] / w1_rate:.2f}x W1)" if w1_rate else ""
        add(
            "W9 agents",
            f"the same drain by {r['agents']} agents over the API: jobs/s{share}",
            _fmt(r["jobsPerSDb"]),
        )
        split = r.get("cpuUsPerJob")
        if split:
            add(
                "",
                "  CPU us / job: Postgres / agents / API (after start-up)",
                f"{split['postgres']} / {split['agents']} / {split['api']}",
            )
    if "w2" in results:
        r = results["w2"]
        add(
            "W2 DAG",
            f"{r['runs']:,} runs x 10-step diamond chain: steps/s",
            _fmt(r["stepsPerSDb"]),
            "",
            "",
            _fmt(_peer(results, "dbos", "w2", "stepsPerS")),
        )
        add(
            "",
            "  runs/s (DBOS: 3-step workflows/s)",
            _fmt(r["runsPerSDb"]),
            "",
            "",
            _fmt(_peer(results, "dbos", "w2", "workflowsPerS")),
        )
    if "w3" in results:
        r = results["w3"]
        for key, label in (("p50Ms", "p50"), ("p99Ms", "p99")):
            add(
                "W3 pickup" if key == "p50Ms" else "",
                f"{r['n']} jobs at {r['ratePerS']:.0f}/s, commit -> start {label} (ms)",
                _fmt(r[key]),
                *(_fmt(_peer(results, p, "w3", key)) for p in peers),
            )
    if "w4" in results:
        r = results["w4"]
        for i, (backlog, rate) in enumerate(r["rates"].items()):
            add("" if i else "W4 backlog", f"{int(backlog):,} ready: steps/s", _fmt(rate))
        add("", "  rate at the largest / at the smallest", _fmt(r["ratio"]))
    if "w5" in results:
        r = results["w5"]
        add("W5 big run", f"POST /runs, {r['steps']:,} steps: median ms", _fmt(r["medianMs"]))
    if "w6" in results:
        r = results["w6"]
        for rel in ("steps", "audit_log"):
            s = r["tables"].get(rel, {})
            add(
                "W6 churn" if rel == "steps" else "",
                f"after {r['steps']:,} steps: {rel} table+indexes MB (dead tuples)",
                f"{s.get('tableMb', 0) + s.get('indexesMb', 0):,.1f} ({s.get('dead', 0):,})",
            )
        if "retention" in r:
            for row in _retention_rows(r["retention"]):
                add(*row)
    if "w8" in results:
        r = results["w8"]
        every = " / ".join(_fmt(v) if v is None else f"{v:.2f}" for v in r["joinStartAllS"])
        add(
            "W8 map",
            f"{r['children']:,} no-op children, {r['workers']} processes: submit -> join"
            f" start, median s ({every})",
            "-" if r["joinStartS"] is None else f"{r['joinStartS']:.2f}",
        )
        add(
            "",
            "  submit -> map expanded, median s",
            "-" if r["expandS"] is None else f"{r['expandS']:.3f}",
        )
        add("", "  children/s, expanded -> last child done", _fmt(r["childrenPerS"]))
        add(
            "",
            "  map output: JSON array of the children's outputs, in order",
            f"{_fmt(r['outputLength'])} {'ok' if r['outputOk'] else 'WRONG'}",
        )
    if "steps" in w1:
        rss = w1["steps"]["rss"]
        add("W7 memory", "RSS after W1: worker / API (MiB)", f"{rss['workerMb']} / {rss['apiMb']}")
    if "ceiling" in results:
        c = results["ceiling"]
        for i, (batch, r) in enumerate(c["batches"].items()):
            add(
                "" if i else "ceiling",
                f"bare SKIP LOCKED claim+complete, batch {batch}: jobs/s ({r['jobs']:,} jobs,"
                f" {r['processes']} x {r['connectionsPerProcess']} connections)",
                _fmt(r["jobsPerSDb"]),
            )
        for batch, r in c["batches"].items():
            add(
                "",
                f"  batch {batch}: WAL bytes / job, commits / job",
                f"{r['cost']['walBytesPerJob']:,.0f} / {r['cost']['commitsPerJob']:.2f}",
            )
        if "steps" in w1 and c.get("best"):
            add(
                "",
                "  W1 as a fraction of the ceiling (best batch)",
                f"{w1['steps']['jobsPerSDb'] / c['best']:.2f}",
            )
    if "ws" in results:
        for i, r in enumerate(results["ws"]):
            add(
                "" if i else "WS live",
                f"{r['clients']:,} clients on /ws ({r['mode']}),"
                f" {r['producedEventsPerSecond']:,.0f} events/s: commit -> client"
                " p50 / p99 ms, events lost (resyncs)",
                f"{r['p50Ms']} / {r['p99Ms']}, {r['lostEvents']:,} ({r['resyncs']})",
            )
    if "pgbench" in results and "tps" in results["pgbench"]:
        for i, (c, tps) in enumerate(results["pgbench"]["tps"].items()):
            add(
                "" if i else "ceiling",
                f"pgbench single-row UPDATE, {c} clients: commits/s",
                _fmt(tps),
            )
        if "steps" in w1 and "16" in results["pgbench"]["tps"]:
            frac = w1["steps"]["jobsPerSDb"] / results["pgbench"]["tps"]["16"]
            add("", "  W1 jobs/s as a fraction of 16-client UPDATEs/s", f"{frac:.2f}")
    return out


def goals(results: dict[str, Any]) -> list[tuple[str, str, bool | None]]:
    """Issue 14's goals (and W8's) against this run's figures: ``(goal, measured, met)``;
    `met` is None when a figure it needs is missing (a peer not installed, a workload not
    run)."""

    def num(value: Any) -> float | None:
        return float(value) if isinstance(value, int | float) else None

    out: list[tuple[str, str, bool | None]] = []

    def ratio(goal: str, a: Any, b: Any, at_least: float) -> None:
        x, y = num(a), num(b)
        if x is None or y is None or y == 0:
            out.append((goal, "-", None))
        else:
            out.append((goal, f"{x / y:.2f}x", x / y >= at_least))

    w1 = results.get("w1", {}).get("steps", {}).get("jobsPerSDb")
    w2 = results.get("w2", {})
    pgq_w1 = _peer(results, "pgqueuer", "w1", "jobsPerS")
    ratio("W1 >= 1.5x PgQueuer", w1, pgq_w1, 1.5)
    ratio(
        "W2 runs/s >= 10x DBOS workflows/s",
        w2.get("runsPerSDb"),
        _peer(results, "dbos", "w2", "workflowsPerS"),
        10,
    )
    ratio("W2 steps/s >= PgQueuer W1 jobs/s", w2.get("stepsPerSDb"), pgq_w1, 1.0)
    w3 = results.get("w3")
    if w3:
        out.append(("W3 p50 <= 3 ms", f"{w3['p50Ms']} ms", w3["p50Ms"] <= 3))
        out.append(("W3 p99 <= 10 ms", f"{w3['p99Ms']} ms", w3["p99Ms"] <= 10))
    w4 = results.get("w4")
    if w4 and w4.get("ratio") is not None:
        out.append(("W4 largest >= 90 % of smallest", f"{w4['ratio']:.0%}", w4["ratio"] >= 0.9))
    w5 = results.get("w5")
    if w5:
        ms = w5["medianMs"]
        out.append((f"W5 POST {w5['steps']:,} steps: median <= 0.5 s", f"{ms} ms", ms <= 500))
    ratio("W9 agents >= 0.5x W1", results.get("w9", {}).get("jobsPerSDb"), w1, 0.5)
    ws = results.get("ws")
    if ws:
        best = min(ws, key=lambda r: r["p99Ms"])
        lost = sum(r["lostEvents"] for r in ws)
        resyncs = sum(r["resyncs"] for r in ws)
        out.append(
            (
                f"WS {best['clients']:,} clients: p99 <= 100 ms, nothing lost",
                f"{best['p99Ms']} ms ({best['mode']}), {lost} lost, {resyncs} resyncs",
                best["p99Ms"] <= 100 and lost == 0 and resyncs == 0,
            )
        )
    w8 = results.get("w8")
    if w8:
        goal = f"W8 map {w8['children']:,} -> join start under 10 s"
        secs = num(w8.get("joinStartS"))
        if secs is None:
            out.append((goal, "-", False))
        else:
            wrong = "" if w8["outputOk"] else " (output WRONG)"
            out.append((goal, f"{secs:.2f} s{wrong}", secs < 10 and bool(w8["outputOk"])))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--only", choices=WORKLOADS, action="append", help="run only these")
    p.add_argument("--quick", action="store_true", help="small sizes: a ~1 minute smoke run")
    p.add_argument("--no-peers", action="store_true", help="pgdag and pgbench only")
    p.add_argument("--w6-steps", type=int, help="steps through W6 (default 1,000,000)")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results.json")
    args = p.parse_args(argv)
    size = dict(QUICK if args.quick else FULL)
    if args.w6_steps:
        size["w6_steps"] = args.w6_steps
    only = set(args.only or WORKLOADS)
    if args.no_peers:
        only.discard("peers")

    console = Console(width=150)
    base = resolve_database_url(Settings.from_env())
    results: dict[str, Any] = {"machine": machine(base), "quick": args.quick, "sizes": size}
    console.print(f"machine: {json.dumps(results['machine'])}")

    def step(name: str, call: Callable[[], Any]) -> None:
        t0 = time.perf_counter()
        console.print(f"[bold]{name}[/bold] ...")
        results[name] = call()
        console.print(f"  {json.dumps(results[name], default=str)[:400]}")
        console.print(f"  ({time.perf_counter() - t0:.1f} s)")

    if "w1" in only:
        step(
            "w1",
            lambda: {
                "runs": pgdag_bench.w1(base, size["w1_jobs"], shape="runs"),
                "steps": pgdag_bench.w1(base, size["w1_jobs"], shape="steps"),
            },
        )
    if "w2" in only:
        step("w2", lambda: pgdag_bench.w2(base, size["w2_runs"]))
    if "w3" in only:
        step("w3", lambda: pgdag_bench.w3(base, size["w3_jobs"], size["w3_rate"]))
    if "w4" in only:
        step("w4", lambda: pgdag_bench.w4(base, size["w4_backlogs"], size["w4_measured"]))
    if "w5" in only:
        step("w5", lambda: pgdag_bench.w5(base, size["w5_steps"], size["w5_repeats"]))
    if "w6" in only:
        step("w6", lambda: pgdag_bench.w6(base, size["w6_steps"]))
    if "w8" in only:
        step("w8", lambda: pgdag_bench.w8_map(base, size["w8_children"], size["w8_repeats"]))
    if "w9" in only:
        step("w9", lambda: pgdag_bench.w9_agents(base, size["w1_jobs"]))
    if "ceiling" in only:
        step("ceiling", lambda: ceiling.run(base, size["w1_jobs"], size["ceiling_batches"]))
    if "ws" in only:
        step(
            "ws",
            lambda: ws_latency.run(
                clients=[size["ws_clients"]],
                rate=size["ws_rate"],
                seconds=size["ws_seconds"],
                modes=list(size["ws_modes"]),
                warmup_s=size["ws_warmup_s"],
                base=base,
            ),
        )
    if "pgbench" in only:
        step("pgbench", lambda: pgbench.run(base, (8, 16), size["pgbench_seconds"]))
    if "peers" in only:
        step("peers", lambda: run_peers(base, size))
    if "explain" in only:
        step("explain", lambda: bench_explain(base, size["explain_steps"]))
        for name, plan in results["explain"]["plans"].items():
            console.print(f"--- {name}\n" + "\n".join(plan), highlight=False)

    console.print(table(results))
    results["table"] = {"columns": list(COLUMNS), "rows": rows(results)}
    results["goals"] = [{"goal": g, "measured": m, "met": ok} for g, m, ok in goals(results)]
    for g in results["goals"]:
        mark = {True: "met", False: "NOT met", None: "n/a"}[g["met"]]
        console.print(f"goal: {g['goal']:<45} {g['measured']:>14}  {mark}", highlight=False)
    args.out.write_text(json.dumps(results, indent=2, default=str))
    console.print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
