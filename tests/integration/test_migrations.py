"""The migration chain: upgrade head, downgrade base, upgrade head again."""

from __future__ import annotations

from engine.migrate import downgrade_base, upgrade_head
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
