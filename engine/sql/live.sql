-- Reads of the live event stream (engine/live.py, engine/ws.py). Loaded with queries.sql by
-- engine/sql/__init__.py. Read-only: nothing here writes.

-- name: live_start
-- Where a new listener starts: the newest visible audit id, and a transaction id assigned to
-- this statement after its snapshot was taken, so larger than that of every transaction that
-- could hold a smaller audit id. (pg_snapshot_xmax is not such a bound: it is the newest
-- *completed* id + 1, and transactions with larger ids may be running.)
SELECT coalesce((SELECT max(id) FROM audit_log), 0) AS max_id,
       pg_current_xact_id()::text::bigint AS probe_xid

-- name: live_session
-- Set once on the listener's connection. audit_log is partitioned by day (migration 0007) and
-- reads by id cannot be pruned to a partition, so planning live_fetch (once per partition)
-- cost more than running it: 2.9 ms a call against 0.67 ms with the generic plan, on 44
-- partitions (docs/operations.md, "Retention"). psycopg prepares a statement from its 5th
-- use; the generic plan (Merge Append of each partition's primary-key index, under the
-- Limit) stays right for every %(known)s, also far behind.
SET plan_cache_mode = force_generic_plan

-- name: live_fetch
-- One wake-up of the listener: up to %(limit)s audit rows above %(known)s (the highest id it
-- has read), plus every row inside the id ranges it still waits for (%(gap_lo)s[i] ..
-- %(gap_hi)s[i]); snap_xmin, the oldest transaction id still running when the one snapshot
-- of this statement was taken (a single statement in autocommit, so pg_current_snapshot()
-- is the snapshot the rows were read under); and when %(probe)s, probe_xid: a transaction id
-- assigned to this statement after that snapshot (see live_start); read_at, the database's
-- clock when read (the LISTEN lag metric). The snap row is always
-- returned (LEFT JOIN), with NULL event columns when nothing is new.
WITH snap AS (
    SELECT pg_snapshot_xmin(pg_current_snapshot())::text::bigint AS snap_xmin,
           CASE WHEN %(probe)s THEN pg_current_xact_id()::text::bigint END AS probe_xid,
           clock_timestamp() AS read_at
), fresh AS (
    SELECT id, run_id, step_id, step_name, event, from_status, to_status, attempt,
           lease_token, worker_id, detail, created_at
    FROM audit_log
    WHERE id > %(known)s
    ORDER BY id
    LIMIT %(limit)s
), late AS (
    -- One ordered primary-key range scan per gap. Written as a LATERAL subquery with ORDER
    -- BY and LIMIT (the gap's size, so it never cuts a row: ids are unique) because the
    -- plain join `a.id BETWEEN g.lo AND g.hi` gets, as a generic plan, a sequential scan of
    -- every partition materialized and filtered once per gap: 27 ms per read on a 60,000-row
    -- audit log, growing with it, where this takes 0.3 ms (docs/operations.md, "Retention").
    SELECT a.*
    FROM unnest(%(gap_lo)s::bigint[], %(gap_hi)s::bigint[]) AS g(lo, hi)
    CROSS JOIN LATERAL (
        SELECT b.id, b.run_id, b.step_id, b.step_name, b.event, b.from_status, b.to_status,
               b.attempt, b.lease_token, b.worker_id, b.detail, b.created_at
        FROM audit_log b
        WHERE b.id BETWEEN g.lo AND g.hi
        ORDER BY b.id
        LIMIT g.hi - g.lo + 1
    ) a
), found AS (
    SELECT * FROM fresh UNION ALL SELECT * FROM late
)
SELECT snap.snap_xmin, snap.probe_xid, snap.read_at, found.*
FROM snap LEFT JOIN found ON true
ORDER BY found.id

-- name: live_begin_snapshot
-- First statement of the transaction a WebSocket snapshot is read in: one consistent view.
SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY

-- name: live_run_event_ids
-- The ids of a run's events visible to the current snapshot (index-only on audit_log_run_idx).
SELECT id FROM audit_log WHERE run_id = %(run_id)s ORDER BY id

-- name: live_replay_run_events
-- A run's events with %(after)s < id <= %(upto)s, oldest first (a reconnecting client).
SELECT id, run_id, step_id, step_name, event, from_status, to_status, attempt, lease_token,
       worker_id, detail, created_at
FROM audit_log
WHERE run_id = %(run_id)s AND id > %(after)s AND id <= %(upto)s
ORDER BY id
LIMIT %(limit)s

-- name: live_replay_events
-- Every run's events with %(after)s < id <= %(upto)s, oldest first (a reconnecting /ws client).
SELECT id, run_id, step_id, step_name, event, from_status, to_status, attempt, lease_token,
       worker_id, detail, created_at
FROM audit_log
WHERE id > %(after)s AND id <= %(upto)s
ORDER BY id
LIMIT %(limit)s
