"""What one ``/metrics`` scrape costs on 1,000,000 steps (docs/operations.md, "Metrics").

``python -m benchmarks.metrics_scrape DATABASE_URL [--ready N]`` fills an empty, migrated
scratch database (setup, not measured; straight SQL like `benchmarks.pgdag_bench`'s
``_insert_backlog``) with 100 runs of 10,000 steps over 5 tools: by default 50,000 ready,
1,000 running, 10,000 dead_letter, 39,000 pending and the rest succeeded (``--ready`` moves
steps from succeeded to ready, up to 950,000). It then prints EXPLAIN (ANALYZE,
BUFFERS) of each gauge query and times the scrape: `engine.metrics.QueueCollector.refresh`
(three statements on one pooled connection) plus the text rendering, cache off, as the
median and max of `ROUNDS` rounds after one warm-up.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time

import psycopg
from prometheus_client import CollectorRegistry

from engine.db import open_pool
from engine.metrics import HEALTH_TABLES, QueueCollector, render
from engine.sql import queries

STEPS = 1_000_000
PER_RUN = 10_000
TOOLS = ("T0", "T1", "T2", "T3", "T4")
ROUNDS = 20


def fill(url: str, ready: int) -> None:
    """The 1,000,000 steps (see the module docstring); `ready` of them ready."""
    running, dead, pending = 1_000, 10_000, 39_000
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO runs (goal, status, steps_total, steps_unfinished)"
            " SELECT 'metrics', 'running', %s, %s FROM generate_series(1, %s)",
            (PER_RUN, PER_RUN, STEPS // PER_RUN),
        )
        conn.execute(
            """
            INSERT INTO steps (run_id, name, tool, input, deps_remaining, status, max_attempts,
                               attempt, lease_token, lease_owner, lease_expires_at, started_at,
                               finished_at, available_at)
            SELECT r.id, 's' || g, 'T' || (g %% 5), '{}', 0, k.status, 3,
                   CASE WHEN k.status IN ('running', 'succeeded', 'dead_letter') THEN 1 ELSE 0
                   END,
                   CASE WHEN k.status = 'running' THEN n END,
                   CASE WHEN k.status = 'running' THEN 'bench' END,
                   CASE WHEN k.status = 'running' THEN now() + interval '1 hour' END,
                   CASE WHEN k.status IN ('running', 'succeeded', 'dead_letter') THEN now() END,
                   CASE WHEN k.status IN ('succeeded', 'dead_letter') THEN now() END,
                   now() - make_interval(secs => n %% 600)
            FROM runs r
            CROSS JOIN generate_series(1, %(per_run)s) g
            CROSS JOIN LATERAL (SELECT (r.seq - 1) * %(per_run)s + g AS n) AS i
            CROSS JOIN LATERAL (SELECT CASE
                WHEN i.n <= %(ready)s THEN 'ready'
                WHEN i.n <= %(ready)s + %(running)s THEN 'running'
                WHEN i.n <= %(ready)s + %(running)s + %(dead)s THEN 'dead_letter'
                WHEN i.n <= %(ready)s + %(running)s + %(dead)s + %(pending)s THEN 'pending'
                ELSE 'succeeded' END AS status) AS k
            ORDER BY r.seq, g
            """,
            {
                "per_run": PER_RUN,
                "ready": ready,
                "running": running,
                "dead": dead,
                "pending": pending,
            },
        )
        conn.execute("VACUUM ANALYZE")


def explain(url: str) -> None:
    """EXPLAIN (ANALYZE, BUFFERS) of each gauge query, printed."""
    params: dict[str, dict[str, object]] = {
        "metrics_queue": {"lease_ttl_s": 30},
        "metrics_pg_tables": {"tables": list(HEALTH_TABLES)},
        "metrics_pg_activity": {},
    }
    with psycopg.connect(url, autocommit=True) as conn:
        for name, args in params.items():
            plan = conn.execute(
                "EXPLAIN (ANALYZE, BUFFERS) " + queries[name],  # type: ignore[operator]
                args,
            ).fetchall()
            print(f"--- {name}")
            for (line,) in plan:
                print(line)


async def timed_scrapes(url: str) -> list[float]:
    """Seconds per scrape (queries + rendering, no cache), `ROUNDS` of them after a warm-up."""
    pool = await open_pool(url, min_size=1, max_size=1, name="metrics-bench")
    try:
        collector = QueueCollector(pool, lease_ttl_s=30, tools=TOOLS, cache_s=0)
        registry = CollectorRegistry()
        registry.register(collector)
        await collector.refresh()
        times = []
        for _ in range(ROUNDS):
            t0 = time.perf_counter()
            await collector.refresh()
            text = render() + render(registry)  # what GET /metrics answers
            times.append(time.perf_counter() - t0)
        assert b"pgdag_steps_ready" in text
        return times
    finally:
        await pool.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("database_url", help="an empty, migrated scratch database")
    parser.add_argument("--ready", type=int, default=50_000, help="ready steps among 1,000,000")
    args = parser.parse_args()
    t0 = time.perf_counter()
    fill(args.database_url, args.ready)
    print(f"filled {STEPS:,} steps ({args.ready:,} ready) in {time.perf_counter() - t0:.1f} s")
    explain(args.database_url)
    times = asyncio.run(timed_scrapes(args.database_url))
    print(
        f"scrape: median {statistics.median(times) * 1000:.1f} ms, "
        f"max {max(times) * 1000:.1f} ms over {ROUNDS} rounds"
    )


if __name__ == "__main__":
    main()
