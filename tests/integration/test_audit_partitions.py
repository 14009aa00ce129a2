"""The audit log partitioned by day (migration 0007) and its upkeep (engine/retention.py):
rows land in their day's partition, upkeep creates ahead and drops whole partitions past the
retention (never one holding a young row), two processes' upkeeps do not collide, DDL does
not queue behind a long reader, and the migration keeps every row both ways."""

from __future__ import annotations

import asyncio
import re
import uuid
from collections.abc import Coroutine
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

import psycopg
from alembic import command
from psycopg import sql
from psycopg.rows import dict_row

from engine.migrate import alembic_config, upgrade_head
from engine.retention import AuditUpkeep, maintain_audit_partitions
from engine.sql import queries
from engine.store import read_live_events, setup_live_session
from tests.support import api_server, query, submit, wait_for, wait_run_finished, workers

T = TypeVar("T")


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)


def part_name(day: date) -> str:
    return f"audit_log_p{day:%Y%m%d}"


def db_today(db_url: str) -> date:
    (row,) = query(db_url, "SELECT (now() AT TIME ZONE 'UTC')::date AS d")
    return row["d"]  # type: ignore[no-any-return]


def partitions(db_url: str) -> dict[str, dict[str, Any]]:
    return {r["partition_name"]: r for r in query(db_url, queries["list_audit_partitions"])}


def insert_event(db_url: str, created_at: datetime | None = None, event: str = "test") -> int:
    """One audit row (no run: audit_log has no foreign key) at `created_at` (default now())."""
    (row,) = query(
        db_url,
        "INSERT INTO audit_log (run_id, event, created_at)"
        " VALUES (%(run)s, %(event)s, coalesce(%(at)s, now())) RETURNING id",
        {"run": uuid.uuid4(), "event": event, "at": created_at},
    )
    return int(row["id"])


def where(db_url: str, event_id: int) -> str:
    (row,) = query(
        db_url,
        "SELECT tableoid::regclass::text AS part FROM audit_log WHERE id = %(id)s",
        {"id": event_id},
    )
    return str(row["part"])


def upkeep(db_url: str, **kwargs: Any) -> AuditUpkeep:
    async def go() -> AuditUpkeep:
        async with await psycopg.AsyncConnection.connect(
            db_url, autocommit=True, row_factory=dict_row
        ) as conn:
            return await maintain_audit_partitions(conn, **kwargs)

    return run(go())


def midnight(day: date) -> datetime:
    return datetime(day.year, day.month, day.day, tzinfo=UTC)


def test_rows_land_in_their_day_partition(db_url: str) -> None:
    today = db_today(db_url)
    assert part_name(today) in partitions(db_url)  # the migration made today + 7 days
    assert part_name(today + timedelta(days=7)) in partitions(db_url)
    now_id = insert_event(db_url)
    assert where(db_url, now_id) == part_name(today)
    soon = midnight(today + timedelta(days=2)) + timedelta(hours=23, minutes=59, seconds=59)
    assert where(db_url, insert_event(db_url, soon)) == part_name(today + timedelta(days=2))
    # A day without a partition: the DEFAULT partition catches it ...
    far = midnight(today + timedelta(days=40)) + timedelta(hours=1)
    far_id = insert_event(db_url, far)
    assert where(db_url, far_id) == "audit_log_default"
    # ... and upkeep gives it its own partition, moving the row in.
    did = upkeep(db_url, retention_days=30, ahead_days=7)
    assert did.created == (part_name(today + timedelta(days=40)),)
    assert did.moved_rows == 1
    assert where(db_url, far_id) == part_name(today + timedelta(days=40))
    assert query(db_url, "SELECT count(*) AS n FROM audit_log_default")[0]["n"] == 0
    # The identity still hands out growing ids on the partitioned table.
    assert insert_event(db_url) > far_id


def test_upkeep_creates_ahead_and_drops_old_partitions(db_url: str) -> None:
    today = db_today(db_url)
    old_days = [today - timedelta(days=d) for d in (45, 40, 31)]
    old_ids = [insert_event(db_url, midnight(d) + timedelta(hours=12)) for d in old_days]
    # Keep everything: the old rows get partitions of their own; 12 days ahead are made.
    did = upkeep(db_url, retention_days=None, ahead_days=12)
    assert set(did.created) == {part_name(d) for d in old_days} | {
        part_name(today + timedelta(days=i)) for i in range(8, 13)
    }
    assert did.dropped == ()
    assert [where(db_url, i) for i in old_ids] == [part_name(d) for d in old_days]
    again = upkeep(db_url, retention_days=None, ahead_days=12)
    assert not again  # idempotent
    # A retention of 30 days drops the three old days whole, and nothing else.
    young_id = insert_event(db_url, midnight(today - timedelta(days=29)) + timedelta(hours=1))
    did = upkeep(db_url, retention_days=30, ahead_days=12)
    assert set(did.dropped) == {part_name(d) for d in old_days}
    assert did.created == (part_name(today - timedelta(days=29)),)  # moved out of DEFAULT
    left = partitions(db_url)
    assert not {part_name(d) for d in old_days} & set(left)
    assert part_name(today + timedelta(days=12)) in left
    rows = query(db_url, "SELECT id FROM audit_log WHERE id = ANY(%(ids)s)", {"ids": old_ids})
    assert rows == []
    assert where(db_url, young_id) == part_name(today - timedelta(days=29))


def test_a_partition_with_one_young_row_is_kept(db_url: str) -> None:
    today = db_today(db_url)
    day = today - timedelta(days=3)
    upper = midnight(day + timedelta(days=1))
    old_id = insert_event(db_url, midnight(day) + timedelta(seconds=1))
    young_id = insert_event(db_url, upper - timedelta(seconds=1))
    upkeep(db_url, retention_days=None, ahead_days=0)
    assert where(db_url, young_id) == part_name(day)

    def retention_days_for(cutoff: datetime) -> float:
        (row,) = query(db_url, "SELECT now() AS now")
        return float((row["now"] - cutoff).total_seconds() / 86400)

    # The retention cut falls a minute before the day ends: its young row is not yet old.
    did = upkeep(db_url, retention_days=retention_days_for(upper - timedelta(minutes=1)))
    assert did.dropped == ()
    assert {where(db_url, old_id), where(db_url, young_id)} == {part_name(day)}
    # Once the cut passes the day's end, every row is older than the retention: dropped.
    did = upkeep(db_url, retention_days=retention_days_for(upper))
    assert did.dropped == (part_name(day),)
    assert query(db_url, "SELECT id FROM audit_log WHERE id IN (%(a)s, %(b)s)",
                 {"a": old_id, "b": young_id}) == []  # fmt: skip


def test_old_rows_in_the_default_partition_are_deleted(db_url: str) -> None:
    today = db_today(db_url)
    with psycopg.connect(db_url, autocommit=True) as conn:
        # No partition for 50 days ago and none is made for a day past the retention.
        conn.execute(
            "INSERT INTO audit_log (run_id, event, created_at)"
            " SELECT gen_random_uuid(), 'old', %(at)s FROM generate_series(1, 5)",
            {"at": midnight(today - timedelta(days=50))},
        )
    did = upkeep(db_url, retention_days=30)
    assert did.deleted_rows == 5
    assert did.created == ()
    assert query(db_url, "SELECT count(*) AS n FROM audit_log_default")[0]["n"] == 0


def test_concurrent_upkeep_from_two_connections(db_url: str) -> None:
    """While one upkeep holds the advisory lock, a second returns at once as busy (no
    wait, no error, nothing done twice); many at once create each partition exactly once."""
    today = db_today(db_url)
    far = [midnight(today + timedelta(days=d)) for d in (30, 31)]
    for at in far:
        insert_event(db_url, at)

    async def held_then_second() -> tuple[list[dict[str, Any]], AuditUpkeep, AuditUpkeep]:
        first = await psycopg.AsyncConnection.connect(db_url, row_factory=dict_row)
        second = await psycopg.AsyncConnection.connect(
            db_url, autocommit=True, row_factory=dict_row
        )
        try:
            async with first.transaction():
                cur = await first.execute(
                    queries["maintain_audit_partitions"],
                    {"retention_s": None, "ahead_days": 20, "lock_timeout_ms": 2000},
                )
                made = await cur.fetchall()
                during = await asyncio.wait_for(
                    maintain_audit_partitions(second, retention_days=None, ahead_days=20), 30
                )
            after = await maintain_audit_partitions(second, retention_days=None, ahead_days=20)
            return made, during, after
        finally:
            await first.close()
            await second.close()

    made, during, after = run(held_then_second())
    expected = {part_name(today + timedelta(days=i)) for i in range(8, 21)} | {
        part_name(at.date()) for at in far
    }
    assert {r["partition_name"] for r in made if r["action"] == "created"} == expected
    assert during == AuditUpkeep(busy=True)
    assert after == AuditUpkeep()  # the first one's work is committed: nothing left

    async def many_at_once() -> list[AuditUpkeep]:
        conns = [
            await psycopg.AsyncConnection.connect(db_url, autocommit=True, row_factory=dict_row)
            for _ in range(4)
        ]
        try:
            return await asyncio.gather(
                *(maintain_audit_partitions(c, retention_days=None, ahead_days=25) for c in conns)
            )
        finally:
            for c in conns:
                await c.close()

    results = run(many_at_once())
    created = [name for r in results for name in r.created]
    assert sorted(created) == sorted(part_name(today + timedelta(days=i)) for i in range(21, 26))
    assert set(partitions(db_url)) >= {part_name(today + timedelta(days=i)) for i in range(26)}


def test_ddl_behind_a_long_reader_is_deferred_not_queued(db_url: str) -> None:
    """A reader holding audit_log (a WebSocket snapshot's transaction) would make a CREATE
    wait, and every writer queue behind it: upkeep gives up after its lock timeout, and
    defers the rest of the pass (creates and drops) without waiting again."""
    today = db_today(db_url)
    old_day = today - timedelta(days=40)
    insert_event(db_url, midnight(old_day))
    upkeep(db_url, retention_days=None, ahead_days=0)
    with psycopg.connect(db_url) as reader:
        reader.execute("SELECT count(*) FROM audit_log")  # holds ACCESS SHARE until the end
        did = upkeep(db_url, retention_days=30, ahead_days=9, lock_timeout_s=0.2)
        assert did.deferred == (
            part_name(today + timedelta(days=8)),
            part_name(today + timedelta(days=9)),
            part_name(old_day),
        )
        assert did.created == () and did.dropped == ()
        reader.rollback()
    did = upkeep(db_url, retention_days=30, ahead_days=9)
    assert did.created == tuple(part_name(today + timedelta(days=i)) for i in (8, 9))
    assert did.dropped == (part_name(old_day),)


def test_pruned_runs_leave_audit_rows_to_their_partition(db_url: str, tmp_path: Path) -> None:
    """prune_finished_runs deletes the run (and steps, edges) only; its audit rows go when
    their day's partition is dropped."""
    run_id = submit(db_url, {"steps": [{"name": "a", "tool": "DELAY", "input": {"ms": 0}}]})
    with workers(db_url, tmp_path, n=1):
        assert wait_run_finished(db_url, run_id) == "completed"
    n_events = len(query(db_url, "SELECT id FROM audit_log WHERE run_id = %(r)s", {"r": run_id}))
    assert n_events >= 3

    async def prune() -> int:
        from engine.transitions import prune_finished_runs

        async with await psycopg.AsyncConnection.connect(
            db_url, autocommit=True, row_factory=dict_row
        ) as conn:
            return await prune_finished_runs(conn, retention_s=0)

    assert run(prune()) == 1
    assert query(db_url, "SELECT id FROM runs WHERE id = %(r)s", {"r": run_id}) == []
    kept = query(db_url, "SELECT id FROM audit_log WHERE run_id = %(r)s", {"r": run_id})
    assert len(kept) == n_events


def test_migration_down_and_up_keeps_rows(db_url: str) -> None:
    today = db_today(db_url)
    ats = [
        midnight(today - timedelta(days=3)) + timedelta(hours=5),
        midnight(today) + timedelta(seconds=1),
        midnight(today + timedelta(days=60)),  # in DEFAULT
    ]
    for i, at in enumerate(ats):
        insert_event(db_url, at, event=f"e{i}")
    select = "SELECT id, run_id, event, created_at FROM audit_log ORDER BY id"
    before = query(db_url, select)

    command.downgrade(alembic_config(db_url), "0006")
    (kind,) = query(db_url, "SELECT relkind FROM pg_class WHERE relname = 'audit_log'")
    assert kind["relkind"] == "r"
    assert query(db_url, select) == before
    plain_id = insert_event(db_url)  # the sequence went on where it was
    assert plain_id > before[-1]["id"]
    before = query(db_url, select)

    upgrade_head(db_url)
    (kind,) = query(db_url, "SELECT relkind FROM pg_class WHERE relname = 'audit_log'")
    assert kind["relkind"] == "p"
    assert query(db_url, select) == before
    assert where(db_url, before[0]["id"]) == part_name(today - timedelta(days=3))
    assert where(db_url, plain_id) == part_name(today)
    assert where(db_url, before[2]["id"]) == part_name(ats[2].date())  # its own partition
    assert insert_event(db_url) > plain_id
    indexes = {r["indexname"] for r in query(db_url, "SELECT indexname FROM pg_indexes")}
    assert {"audit_log_pkey", "audit_log_run_idx"} <= indexes


def test_api_keeps_the_partitions(db_url: str, tmp_path: Path) -> None:
    """The API, as the maintenance leader, runs the upkeep as it takes the lead: partitions
    dropped behind its back come back."""
    today = db_today(db_url)
    ahead = [part_name(today + timedelta(days=i)) for i in range(1, 8)]
    with psycopg.connect(db_url, autocommit=True) as conn:
        for name in ahead:
            conn.execute(f"DROP TABLE {name}")  # type: ignore[arg-type]  # test set-up only
    assert not set(ahead) & set(partitions(db_url))
    with api_server(db_url, tmp_path, PGDAG_REAPER_INTERVAL="0.2"):
        wait_for(
            lambda: set(ahead) <= set(partitions(db_url)),
            timeout_s=30,
            what="the API to recreate the partitions",
        )


def test_maintenance_task_keeps_the_partitions(db_url: str) -> None:
    """The maintenance leader's pruner and audit_partitions tasks (engine/maintenance/): a
    missing day ahead is created, a day past the retention dropped."""
    from engine.config import Settings
    from engine.db import open_pool
    from engine.maintenance import AuditPartitions, Pruner
    from engine.store import Store

    today = db_today(db_url)
    old_id = insert_event(db_url, midnight(today - timedelta(days=40)))
    upkeep(db_url, retention_days=None, ahead_days=0)  # its day gets a partition
    assert where(db_url, old_id) == part_name(today - timedelta(days=40))
    ahead = part_name(today + timedelta(days=3))
    query(db_url, f"DROP TABLE {ahead}")

    async def go() -> None:
        pool = await open_pool(db_url, min_size=1, max_size=2)
        try:
            store = Store(pool, lease_ttl_s=30)
            settings = Settings(retention_days=30)
            await Pruner(settings).run_once(store)
            assert await AuditPartitions(settings).run_once(store) >= 2  # created, dropped
        finally:
            await pool.close()

    run(go())
    left = partitions(db_url)
    assert ahead in left
    assert part_name(today - timedelta(days=40)) not in left


def test_listener_reads_gaps_by_index_under_its_generic_plan(db_url: str) -> None:
    """The listener's `live_fetch`, prepared and planned generically on its session (as
    engine.live runs it), finds the rows inside its gaps by primary-key range scans. A join
    `a.id BETWEEN g.lo AND g.hi` got a sequential scan of each partition, materialized and
    filtered per gap, as its generic plan: every read with a gap then cost a scan of the
    whole audit log (27 ms at 60,000 rows in W1)."""
    query(
        db_url,
        "INSERT INTO audit_log (run_id, event) SELECT gen_random_uuid(), 'bulk'"
        " FROM generate_series(1, 5000)",
    )
    (top,) = query(db_url, "SELECT max(id) AS m FROM audit_log")
    known = int(top["m"])
    gaps = [(known - 4000, known - 3998), (known - 2000, known - 1990), (known - 10, known - 10)]

    async def go() -> tuple[list[int], list[dict[str, Any]], list[dict[str, Any]]]:
        async with await psycopg.AsyncConnection.connect(
            db_url, autocommit=True, row_factory=dict_row
        ) as conn:
            await setup_live_session(conn)
            got = None
            for _ in range(8):  # psycopg prepares from the 5th use (prepare_threshold)
                got = await read_live_events(conn, known=known, gaps=gaps, limit=100, probe=False)
            assert got is not None
            cur = await conn.execute(
                "SELECT name, generic_plans FROM pg_prepared_statements"
                " WHERE statement LIKE '%%FROM unnest(%%'"
            )
            prepared = await cur.fetchall()
            assert prepared, "live_fetch was not prepared"
            values = {
                "probe": False,
                "known": known,
                "limit": 100,
                "gap_lo": [lo for lo, _ in gaps],
                "gap_hi": [hi for _, hi in gaps],
            }
            # psycopg numbers the parameters in the order they first appear in the text.
            order = dict.fromkeys(re.findall(r"%\((\w+)\)s", queries["live_fetch"]))
            args = sql.SQL(", ").join(sql.Literal(values[name]) for name in order)
            explain = sql.SQL("EXPLAIN (FORMAT JSON) EXECUTE {}({})").format(
                sql.Identifier(prepared[0]["name"]), args
            )
            cur = await conn.execute(explain)
            plan = (await cur.fetchone())["QUERY PLAN"]  # type: ignore[index]
            return [int(r["id"]) for r in got.rows], prepared, plan

    ids, prepared, plan = run(go())
    assert ids == [i for lo, hi in gaps for i in range(lo, hi + 1)]
    assert prepared[0]["generic_plans"] > 0

    def nodes(node: dict[str, Any]) -> list[dict[str, Any]]:
        return [node, *(n for child in node.get("Plans", []) for n in nodes(child))]

    scans = [n for n in nodes(plan[0]["Plan"]) if n.get("Relation Name", "").startswith("audit")]
    assert scans, plan
    assert {n["Node Type"] for n in scans} <= {"Index Scan", "Index Only Scan"}, plan
