"""``python -m benchmarks.audit_reads [--plain]``: the audit log's reads by id on a
partitioned ``audit_log`` (migration 0007) or, with ``--plain``, on the plain table of
migration 0006, for docs/operations.md ("Retention").

Fills a fresh database with 1,000,000 audit rows over 35 days (ids growing with
``created_at``; 10,000 runs of 100 events), prints ``EXPLAIN (ANALYZE, BUFFERS)`` of each
read of engine/sql/live.sql and ``list_run_events`` after a warm-up, then the mean time of
500 calls in a row from one connection (psycopg prepares a statement from its 5th use), with
``plan_cache_mode`` auto (the pool's connections) and force_generic_plan (the listener's).
Uses ``DATABASE_URL`` when set, else the embedded cluster under ``PGDAG_HOME``.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

import psycopg
from alembic import command

from benchmarks.common import scratch_db
from engine.config import Settings
from engine.db import resolve_database_url
from engine.migrate import alembic_config
from engine.sql import queries

ROWS = 1_000_000
DAYS = 35

FILL = """
INSERT INTO audit_log (run_id, step_id, step_name, event, from_status, to_status, attempt,
                       lease_token, worker_id, created_at)
SELECT md5((g / 100)::text)::uuid, g, 's' || (g %% 100), 'step_succeeded', 'running',
       'succeeded', 1, g, 'w1', now() - make_interval(days => %(days)s) * (1 - g::float8 / %(rows)s)
FROM generate_series(1, %(rows)s) AS g
ORDER BY g
"""
DAY_PARTITIONS = """
SELECT pgdag_audit_partition_v1(((now() AT TIME ZONE 'UTC')::date - i))
FROM generate_series(1, %(days)s) AS i
"""


def measure(url: str, plain: bool) -> None:
    """Fill `url`'s audit_log and print the plans and timings (see the module doc)."""
    if plain:
        command.downgrade(alembic_config(url), "0006")
    with psycopg.connect(url, autocommit=True) as conn:
        if not plain:
            conn.execute(DAY_PARTITIONS, {"days": DAYS})
        conn.execute(FILL, {"days": DAYS, "rows": ROWS})
        conn.execute("VACUUM ANALYZE audit_log")
        parts = conn.execute(
            "SELECT count(*) FROM pg_inherits WHERE inhparent = 'audit_log'::regclass"
        ).fetchone()
        top = conn.execute("SELECT max(id) FROM audit_log").fetchone()
        assert parts is not None and top is not None
        newest = int(top[0])
        run = conn.execute(
            "SELECT run_id FROM audit_log WHERE id = %s", (newest - 5000,)
        ).fetchone()
        assert run is not None
        print(f"audit_log: {ROWS:,} rows over {DAYS} days, {parts[0]} partitions")
        cases: dict[str, dict[str, Any]] = {
            "live_start": {},
            "live_fetch": {
                "probe": False,
                "known": newest - 50,
                "limit": 1000,
                "gap_lo": [newest - 300],
                "gap_hi": [newest - 290],
            },
            "live_run_event_ids": {"run_id": run[0]},
            "live_replay_run_events": {"run_id": run[0], "after": 0, "upto": newest, "limit": 1000},
            "live_replay_events": {"after": newest - 1000, "upto": newest, "limit": 1000},
            "list_run_events": {"run_id": run[0], "after": 0, "limit": 1000},
        }
        explain = "EXPLAIN (ANALYZE, BUFFERS, COSTS OFF, SUMMARY ON) "
        for name, params in cases.items():
            for _ in range(2):  # the second one is warm
                plan = conn.execute(explain + queries[name], params).fetchall()  # type: ignore[operator]
            print(f"--- {name}\n" + "\n".join(r[0] for r in plan))
    # The listener's connection plans generically (live_session); the pool's do not.
    for mode in ("auto", "force_generic_plan"):
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute(f"SET plan_cache_mode = {mode}")  # type: ignore[arg-type]
            for name, params in cases.items():
                t0 = time.perf_counter()
                for _ in range(500):
                    conn.execute(queries[name], params).fetchall()
                ms = (time.perf_counter() - t0) / 500 * 1000
                print(f"timed {name}, plan_cache_mode {mode}: {ms:.3f} ms per call (500 calls)")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.audit_reads", description=__doc__)
    p.add_argument("--plain", action="store_true", help="the plain table of migration 0006")
    args = p.parse_args(argv)
    base = resolve_database_url(Settings.from_env())
    with scratch_db(base, "pgdag_bench_audit_reads") as url:
        measure(url, args.plain)
    return 0


if __name__ == "__main__":
    sys.exit(main())
