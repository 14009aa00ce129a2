"""The migration chain: upgrade head, downgrade base, upgrade head again."""

from __future__ import annotations

from datetime import UTC, datetime

import psycopg
import pytest
from alembic import command

from engine.migrate import alembic_config, downgrade_base, upgrade_head
from tests.support import query

TABLES = {"runs", "steps", "step_edges", "audit_log", "workers"}


def tables(url: str) -> set[str]:
    rows = query(url, "SELECT tablename FROM pg_tables WHERE schemaname = 'public'")
    return {r["tablename"] for r in rows}


def test_upgrade_downgrade_upgrade(db_url: str) -> None:
    assert tables(db_url) >= TABLES
    downgrade_base(db_url)
    assert tables(db_url) & TABLES == set()
    upgrade_head(db_url)
    assert tables(db_url) >= TABLES
    indexes = {r["indexname"] for r in query(db_url, "SELECT indexname FROM pg_indexes")}
    assert {"steps_ready_idx", "steps_lease_idx", "audit_log_run_idx"} <= indexes
    columns = query(
        db_url,
        "SELECT column_name FROM information_schema.columns WHERE table_name = 'runs'",
    )
    assert "idempotency_fingerprint" in {c["column_name"] for c in columns}


def test_0005_repairs_start_times_no_read_could_load(db_url: str) -> None:
    """Before the API bounded startAt, year 0 and year 10000 (in UTC) were stored; psycopg
    cannot load them, so every read of the run failed. Migration 0005 clamps them."""
    command.downgrade(alembic_config(db_url), "0004")  # undo 0005 only
    run = query(
        db_url,
        "INSERT INTO runs (goal, steps_total, steps_unfinished, start_at) VALUES"
        " ('year 0', 1, 1, '0001-12-31 23:00:00+00 BC'),"
        " ('year 10000', 1, 1, '10000-01-01 00:59:59+00') RETURNING id, goal",
    )
    late = next(r["id"] for r in run if r["goal"] == "year 10000")
    query(
        db_url,
        "INSERT INTO steps (run_id, name, tool, input, deps_remaining, status, max_attempts,"
        " available_at) VALUES (%(run)s, 'a', 'DELAY', '{}', 0, 'pending', 1,"
        " '10000-01-01 00:59:59+00')",
        {"run": late},
    )
    with pytest.raises(psycopg.DataError):
        query(db_url, "SELECT start_at FROM runs")
    upgrade_head(db_url)
    got = {r["goal"]: r["start_at"] for r in query(db_url, "SELECT goal, start_at FROM runs")}
    assert got == {
        "year 0": datetime(1970, 1, 1, tzinfo=UTC),
        "year 10000": datetime(9999, 12, 30, 23, 59, 59, 999999, tzinfo=UTC),
    }
    (step,) = query(db_url, "SELECT available_at FROM steps")
    assert step["available_at"] == datetime(9999, 12, 30, 23, 59, 59, 999999, tzinfo=UTC)
