"""Retention that scales: ``audit_log`` partitioned by day, pruned by dropping partitions.

Before: the pruner deleted a finished run's audit rows with the run (``prune_finished_runs``),
so every pruned event left a dead tuple and two dead index entries for vacuum to find, on
the one table that grows fastest (several rows per step).

- ``audit_log`` becomes ``PARTITION BY RANGE (created_at)``: one partition per UTC day,
  named ``audit_log_pYYYYMMDD`` (``[day 00:00 UTC, next day 00:00 UTC)``), and
  ``audit_log_default`` (the DEFAULT partition), a safety net for rows whose day has no
  partition yet (upkeep did not run for longer than it creates ahead). Upkeep moves such
  rows into their day's partition when it creates it.
- The primary key becomes ``(id, created_at)``: a unique key of a partitioned table must
  hold the partition key. ``id`` stays the identity (one sequence, the old one's position
  carried over), so ids are taken as before, which engine/live.py relies on, and stay unique
  though no index says so across partitions: only the sequence assigns them
  (``GENERATED ALWAYS``).
- ``audit_log_run_idx (run_id, id)`` is kept (on every partition); reads by ``id`` use each
  partition's primary-key index (``id`` leads it): a ``Merge Append`` of one short index
  scan per partition (docs/operations.md, "Retention", has the plans).
- The statement trigger ``audit_log_notify`` is recreated on the partitioned table (its
  transition table sees the rows of every partition).
- Rows are moved in the migration's transaction (``ACCESS EXCLUSIVE`` on the old table
  while it runs: 9.9 s for 1,000,000 rows over 35 days on the benchmark machine), each day
  straight into its partition.
- ``pgdag_audit_partition_v1(day)`` creates one day's partition (moving that day's rows out
  of the DEFAULT partition, if any); ``pgdag_maintain_audit_partitions_v1(retention,
  ahead_days, lock_timeout_ms)`` is the whole upkeep (engine/retention.py calls it):
  under an advisory lock (a second process finds it taken and leaves the work to the
  first, reporting ``busy``), create today + ``ahead_days`` (and the day of any row in
  DEFAULT), drop each partition whose upper bound is older than ``now() - retention``
  (every row in it is older than the retention), delete DEFAULT's rows older than the
  retention. Each DDL waits at most ``lock_timeout_ms`` for its lock (it needs ``ACCESS
  EXCLUSIVE`` on ``audit_log`` for an instant); one that cannot get it is reported
  ``deferred`` and tried at the next pass (with every later one of the pass, without
  waiting again), so upkeep never queues every writer behind a long reader and a pass
  waits at most once.
- No foreign key points from ``audit_log`` to ``runs`` (dropped in 0002), so neither a DROP
  of a partition nor a DELETE of a run checks the other table.
- The insert-vacuum settings of 0002 are not carried over: a partitioned table has no
  storage parameters, and Postgres's defaults (vacuum after 20 % new rows) suit a daily
  partition, which stops growing the next day.

Downgrade: back to one plain table with ``id`` as its key, rows and sequence position kept.
"""

from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None

COLUMNS = (
    "id, run_id, step_id, step_name, event, from_status, to_status, attempt, lease_token,"
    " worker_id, detail, created_at"
)

FUNCTIONS = r"""
CREATE FUNCTION pgdag_audit_partition_v1(day date) RETURNS bigint
LANGUAGE plpgsql AS $$
-- Create the partition of `day` (UTC) if it does not exist. Returns NULL when it existed,
-- else how many rows were moved into it from the DEFAULT partition (usually 0). The caller
-- serializes calls (advisory lock); CREATE ... IF NOT EXISTS keeps a race harmless anyway.
DECLARE
    part text := 'audit_log_p' || to_char(day, 'YYYYMMDD');
    lo timestamptz := day::timestamp AT TIME ZONE 'UTC';
    hi timestamptz := (day + 1)::timestamp AT TIME ZONE 'UTC';
    moved bigint := 0;
BEGIN
    IF to_regclass(quote_ident(part)) IS NOT NULL THEN
        RETURN NULL;
    END IF;
    IF EXISTS (SELECT 1 FROM audit_log_default WHERE created_at >= lo AND created_at < hi) THEN
        -- A new partition may not hold rows that DEFAULT holds: move them, then attach.
        EXECUTE format('CREATE TABLE %I (LIKE audit_log INCLUDING DEFAULTS)', part);
        EXECUTE format(
            'WITH gone AS (DELETE FROM audit_log_default'
            ' WHERE created_at >= $1 AND created_at < $2 RETURNING *)'
            ' INSERT INTO %I SELECT * FROM gone', part) USING lo, hi;
        GET DIAGNOSTICS moved = ROW_COUNT;
        EXECUTE format('ALTER TABLE audit_log ATTACH PARTITION %I FOR VALUES FROM (%L) TO (%L)',
                       part, lo, hi);
    ELSE
        EXECUTE format('CREATE TABLE IF NOT EXISTS %I PARTITION OF audit_log'
                       ' FOR VALUES FROM (%L) TO (%L)', part, lo, hi);
    END IF;
    RETURN moved;
END
$$;

CREATE FUNCTION pgdag_maintain_audit_partitions_v1(
    retention interval, ahead_days integer, lock_timeout_ms integer
) RETURNS TABLE (action text, partition_name text, n_rows bigint)
LANGUAGE plpgsql AS $$
-- Audit-log partition upkeep (see migration 0007). `retention` NULL keeps everything.
-- Returns one row per thing done: created (n_rows = rows moved from DEFAULT), dropped,
-- deleted (rows of DEFAULT older than the retention), deferred (a lock not granted within
-- lock_timeout_ms: tried at the next pass; after the first, the rest of this pass is
-- deferred without waiting again, so a pass waits at most lock_timeout_ms), busy (another
-- upkeep holds the advisory lock: it does the work). Nothing done, no rows.
DECLARE
    today date := (now() AT TIME ZONE 'UTC')::date;
    cutoff timestamptz := now() - retention;
    d date;
    moved bigint;
    p record;
    n bigint;
    blocked boolean := false;
BEGIN
    IF NOT pg_try_advisory_xact_lock(8210605542) THEN
        action := 'busy'; partition_name := NULL; n_rows := NULL;
        RETURN NEXT;
        RETURN;
    END IF;
    PERFORM set_config('lock_timeout', lock_timeout_ms || 'ms', true);
    FOR d IN
        SELECT today + i FROM generate_series(0, greatest(ahead_days, 0)) AS i
        UNION
        SELECT DISTINCT (created_at AT TIME ZONE 'UTC')::date FROM audit_log_default
        WHERE cutoff IS NULL OR created_at >= cutoff
        ORDER BY 1
    LOOP
        IF blocked THEN
            IF to_regclass(quote_ident('audit_log_p' || to_char(d, 'YYYYMMDD'))) IS NULL THEN
                action := 'deferred'; partition_name := 'audit_log_p' || to_char(d, 'YYYYMMDD');
                n_rows := NULL;
                RETURN NEXT;
            END IF;
            CONTINUE;
        END IF;
        BEGIN
            moved := pgdag_audit_partition_v1(d);
            IF moved IS NOT NULL THEN
                action := 'created'; partition_name := 'audit_log_p' || to_char(d, 'YYYYMMDD');
                n_rows := moved;
                RETURN NEXT;
            END IF;
        EXCEPTION WHEN lock_not_available THEN
            blocked := true;
            action := 'deferred'; partition_name := 'audit_log_p' || to_char(d, 'YYYYMMDD');
            n_rows := NULL;
            RETURN NEXT;
        END;
    END LOOP;
    IF cutoff IS NULL THEN
        RETURN;
    END IF;
    FOR p IN
        SELECT c.relname,
               substring(pg_get_expr(c.relpartbound, c.oid) FROM 'TO \(''([^'']+)''\)')
                   ::timestamptz AS upper_bound
        FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
        WHERE i.inhparent = 'audit_log'::regclass
          AND pg_get_expr(c.relpartbound, c.oid) <> 'DEFAULT'
        ORDER BY 2
    LOOP
        CONTINUE WHEN p.upper_bound > cutoff;
        IF NOT blocked THEN
            BEGIN
                EXECUTE format('DROP TABLE %I', p.relname);
                action := 'dropped'; partition_name := p.relname; n_rows := NULL;
                RETURN NEXT;
                CONTINUE;
            EXCEPTION WHEN lock_not_available THEN
                blocked := true;
            END;
        END IF;
        action := 'deferred'; partition_name := p.relname; n_rows := NULL;
        RETURN NEXT;
    END LOOP;
    IF blocked THEN
        RETURN;
    END IF;
    BEGIN
        DELETE FROM audit_log_default WHERE created_at < cutoff;
        GET DIAGNOSTICS n = ROW_COUNT;
        IF n > 0 THEN
            action := 'deleted'; partition_name := 'audit_log_default'; n_rows := n;
            RETURN NEXT;
        END IF;
    EXCEPTION WHEN lock_not_available THEN
        action := 'deferred'; partition_name := 'audit_log_default'; n_rows := NULL;
        RETURN NEXT;
    END;
END
$$;
"""

UPGRADE = (
    r"""
DROP TRIGGER audit_log_notify ON audit_log;
ALTER TABLE audit_log RENAME TO audit_log_unpartitioned;
ALTER INDEX audit_log_pkey RENAME TO audit_log_unpartitioned_pkey;
ALTER INDEX audit_log_run_idx RENAME TO audit_log_unpartitioned_run_idx;
ALTER SEQUENCE audit_log_id_seq RENAME TO audit_log_unpartitioned_id_seq;

CREATE TABLE audit_log (
    id          bigint GENERATED ALWAYS AS IDENTITY,
    run_id      uuid NOT NULL,
    step_id     bigint,
    step_name   text,
    event       text NOT NULL,
    from_status text,
    to_status   text,
    attempt     integer,
    lease_token bigint,
    worker_id   text,
    detail      jsonb,
    created_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (id, created_at)
) PARTITION BY RANGE (created_at);
CREATE INDEX audit_log_run_idx ON audit_log (run_id, id);
CREATE TABLE audit_log_default PARTITION OF audit_log DEFAULT;
"""
    + FUNCTIONS
    + r"""
SELECT pgdag_audit_partition_v1(day)
FROM (SELECT DISTINCT (created_at AT TIME ZONE 'UTC')::date AS day
      FROM audit_log_unpartitioned) AS days;
SELECT pgdag_audit_partition_v1(((now() AT TIME ZONE 'UTC')::date + i))
FROM generate_series(0, 7) AS i;
INSERT INTO audit_log ("""
    + COLUMNS
    + r""") OVERRIDING SYSTEM VALUE
SELECT """
    + COLUMNS
    + r""" FROM audit_log_unpartitioned;
SELECT setval(pg_get_serial_sequence('audit_log', 'id'), last_value, is_called)
FROM audit_log_unpartitioned_id_seq;
DROP TABLE audit_log_unpartitioned;

CREATE TRIGGER audit_log_notify
    AFTER INSERT ON audit_log
    REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION pgdag_notify_audit();
"""
)

DOWNGRADE = (
    r"""
DROP TRIGGER audit_log_notify ON audit_log;
CREATE TABLE audit_log_plain (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    run_id      uuid NOT NULL,
    step_id     bigint,
    step_name   text,
    event       text NOT NULL,
    from_status text,
    to_status   text,
    attempt     integer,
    lease_token bigint,
    worker_id   text,
    detail      jsonb,
    created_at  timestamptz NOT NULL DEFAULT now()
);
INSERT INTO audit_log_plain ("""
    + COLUMNS
    + r""") OVERRIDING SYSTEM VALUE
SELECT """
    + COLUMNS
    + r""" FROM audit_log ORDER BY id;
SELECT setval(pg_get_serial_sequence('audit_log_plain', 'id'), last_value, is_called)
FROM audit_log_id_seq;
DROP TABLE audit_log;
DROP FUNCTION pgdag_maintain_audit_partitions_v1(interval, integer, integer);
DROP FUNCTION pgdag_audit_partition_v1(date);
ALTER TABLE audit_log_plain RENAME TO audit_log;
ALTER INDEX audit_log_plain_pkey RENAME TO audit_log_pkey;
ALTER SEQUENCE audit_log_plain_id_seq RENAME TO audit_log_id_seq;
CREATE INDEX audit_log_run_idx ON audit_log (run_id, id);
ALTER TABLE audit_log SET (autovacuum_vacuum_insert_threshold = 100000,
                           autovacuum_vacuum_insert_scale_factor = 0);
CREATE TRIGGER audit_log_notify
    AFTER INSERT ON audit_log
    REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION pgdag_notify_audit();
"""
)


def upgrade() -> None:
    op.execute(UPGRADE)


def downgrade() -> None:
    op.execute(DOWNGRADE)
