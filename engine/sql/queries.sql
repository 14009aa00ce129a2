-- Every query pgdag runs. Loaded by engine/sql/__init__.py; called only from engine/.
-- Status writes live only in the queries used by engine/transitions.py. Each one is guarded
-- (expected status, and the fencing token for attempt writes) and writes its audit_log rows
-- in the same statement or transaction; the audit_log trigger sends the NOTIFY.
-- Times come from the database clock: now(), never a client's.

-- name: insert_run
-- A new run, or nothing when its idempotency key is already taken (then: select_run_by_key).
INSERT INTO runs (goal, idempotency_key, steps_total, steps_unfinished)
VALUES (%(goal)s, %(idempotency_key)s, %(steps_total)s, %(steps_total)s)
ON CONFLICT (idempotency_key) DO NOTHING
RETURNING id

-- name: select_run_by_key
SELECT id FROM runs WHERE idempotency_key = %(idempotency_key)s

-- name: insert_steps
-- All steps of a run and their edges in one statement. %(steps)s is a JSON array of
-- {"name", "tool", "input", "dependsOn": [...], "maxAttempts", "timeoutMs", "idempotent"}.
WITH spec AS (
    SELECT s.name, s.tool, s.input, coalesce(s."dependsOn", '{}') AS depends_on,
           s."maxAttempts" AS max_attempts, s."timeoutMs" AS timeout_ms, s.idempotent
    FROM jsonb_to_recordset(%(steps)s::jsonb) AS s(
        name text, tool text, input jsonb, "dependsOn" text[], "maxAttempts" integer,
        "timeoutMs" integer, idempotent boolean)
), inserted AS (
    INSERT INTO steps (run_id, name, tool, input, depends_on, deps_remaining, status,
                       max_attempts, timeout_ms, idempotent)
    SELECT %(run_id)s, name, tool, input, depends_on, cardinality(depends_on),
           CASE WHEN cardinality(depends_on) = 0 THEN 'ready' ELSE 'pending' END,
           max_attempts, timeout_ms, idempotent
    FROM spec
    RETURNING id, name, depends_on
), edges AS (
    INSERT INTO step_edges (parent_id, child_id)
    SELECT p.id, c.id
    FROM inserted c
    CROSS JOIN LATERAL unnest(c.depends_on) AS d(name)
    JOIN inserted p ON p.name = d.name
    RETURNING 1
)
INSERT INTO audit_log (run_id, event, to_status, detail)
SELECT %(run_id)s, 'run_created', 'pending',
       jsonb_build_object('steps', (SELECT count(*) FROM inserted),
                          'edges', (SELECT count(*) FROM edges),
                          'ready', (SELECT count(*) FROM inserted WHERE depends_on = '{}'))

-- name: claim_steps
-- ready -> running for up to %(limit)s steps whose backoff has passed. The MATERIALIZED CTE
-- keeps LIMIT + SKIP LOCKED from locking more rows than it returns (PostgreSQL bug #15715).
WITH picked AS MATERIALIZED (
    SELECT id
    FROM steps
    WHERE status = 'ready' AND available_at <= now()
    ORDER BY available_at, id
    LIMIT %(limit)s
    FOR UPDATE SKIP LOCKED
), claimed AS (
    UPDATE steps s
    SET status = 'running',
        attempt = s.attempt + 1,
        lease_token = nextval('lease_token_seq'),
        lease_owner = %(worker_id)s,
        lease_expires_at = now() + make_interval(secs => %(lease_ttl_s)s),
        started_at = now(),
        updated_at = now()
    FROM picked
    WHERE s.id = picked.id
    RETURNING s.id, s.run_id, s.name, s.tool, s.input, s.attempt, s.max_attempts,
              s.timeout_ms, s.idempotent, s.lease_token, s.lease_expires_at
), started_runs AS (
    UPDATE runs r
    SET status = 'running', started_at = now(), updated_at = now()
    WHERE r.id IN (SELECT run_id FROM claimed) AND r.status = 'pending'
    RETURNING r.id
), audit AS (
    INSERT INTO audit_log (run_id, step_id, step_name, event, from_status, to_status,
                           attempt, lease_token, worker_id)
    SELECT id, NULL, NULL, 'run_started', 'pending', 'running', NULL, NULL, %(worker_id)s
    FROM started_runs
    UNION ALL
    SELECT run_id, id, name, 'step_claimed', 'ready', 'running', attempt, lease_token,
           %(worker_id)s
    FROM claimed
)
SELECT * FROM claimed ORDER BY id

-- name: heartbeat_leases
-- Extend the leases this worker still holds. A lease whose token is not current, or which
-- has already expired on the database clock, is not extended: its id is missing from the
-- result and the worker must abandon that attempt.
UPDATE steps s
SET lease_expires_at = now() + make_interval(secs => %(lease_ttl_s)s)
FROM unnest(%(ids)s::bigint[], %(tokens)s::bigint[]) AS l(id, token)
WHERE s.id = l.id
  AND s.lease_token = l.token
  AND s.status = 'running'
  AND s.lease_expires_at > now()
RETURNING s.id

-- name: complete_steps
-- running -> succeeded for each (id, token, output) whose lease is current, in one statement:
-- promote dependents whose last dependency this was (pending -> ready), count the run down
-- and finish it when nothing is left, and audit all of it. Children are locked in id order
-- so that two completions sharing children cannot deadlock.
WITH done AS (
    UPDATE steps s
    SET status = 'succeeded', output = d.output, error = NULL, finished_at = now(),
        lease_owner = NULL, lease_expires_at = NULL, updated_at = now()
    FROM unnest(%(ids)s::bigint[], %(tokens)s::bigint[], %(outputs)s::jsonb[])
         AS d(id, token, output)
    WHERE s.id = d.id
      AND s.lease_token = d.token
      AND s.status = 'running'
      AND s.lease_expires_at > now()
    RETURNING s.id, s.run_id, s.name, s.attempt, s.lease_token, %(worker_id)s::text AS worker_id
), child_counts AS (
    SELECT e.child_id, count(*)::integer AS n
    FROM step_edges e
    JOIN done ON e.parent_id = done.id
    GROUP BY e.child_id
), locked_children AS (
    -- skipped children are counted down too: a manual retry of the dead letter that skipped
    -- them returns them to pending, and their count must then be right
    -- (the count rides along, so that promoted joins one CTE, not two: no n x n loop)
    SELECT c.id, cc.n
    FROM steps c
    JOIN child_counts cc ON cc.child_id = c.id
    WHERE c.status IN ('pending', 'skipped')
    ORDER BY c.id
    FOR UPDATE OF c
), promoted AS (
    UPDATE steps c
    SET deps_remaining = c.deps_remaining - lc.n,
        status = CASE WHEN c.status = 'pending' AND c.deps_remaining - lc.n = 0 THEN 'ready'
                      ELSE c.status END,
        available_at = now(),
        updated_at = now()
    FROM locked_children lc
    WHERE c.id = lc.id AND c.status IN ('pending', 'skipped')
    RETURNING c.id, c.run_id, c.name, c.status
), run_counts AS (
    SELECT run_id, count(*)::integer AS n FROM done GROUP BY run_id
), settled AS (
    UPDATE runs r
    SET steps_unfinished = r.steps_unfinished - rc.n,
        status = CASE WHEN r.steps_unfinished - rc.n > 0 THEN r.status
                      WHEN r.steps_dead > 0 THEN 'failed'
                      ELSE 'completed' END,
        finished_at = CASE WHEN r.steps_unfinished - rc.n = 0 THEN now() END,
        updated_at = now()
    FROM run_counts rc
    WHERE r.id = rc.run_id AND r.status = 'running'
    RETURNING r.id, r.status
), audit AS (
    INSERT INTO audit_log (run_id, step_id, step_name, event, from_status, to_status,
                           attempt, lease_token, worker_id)
    SELECT run_id, id, name, 'step_succeeded', 'running', 'succeeded', attempt, lease_token,
           worker_id
    FROM done
    UNION ALL
    SELECT run_id, id, name, 'step_ready', 'pending', 'ready', NULL, NULL, NULL
    FROM promoted WHERE status = 'ready'
    UNION ALL
    SELECT id, NULL, NULL, 'run_' || status, 'running', status, NULL, NULL, NULL
    FROM settled WHERE status IN ('completed', 'failed')
)
SELECT id, lease_token FROM done

-- name: step_lease_state
-- What became of an attempt whose write matched nothing (lease lost, or an ambiguous commit
-- that did in fact land).
SELECT id, status, lease_token, lease_expires_at > now() AS lease_live
FROM steps WHERE id = %(id)s

-- name: steps_lease_state
-- The same for several attempts at once (a batch of successes of which some matched nothing).
SELECT id, status, lease_token, lease_expires_at > now() AS lease_live
FROM steps WHERE id = ANY(%(ids)s::bigint[])

-- name: fail_attempt
-- running -> ready after a backoff (attempts left, the error is retryable and the step is
-- idempotent) or running -> dead_letter. An "idempotent": false step is never re-run
-- automatically: its failed attempt may have had its effect, so a person decides. Backoff is exponential with full jitter on the database clock:
-- random() * least(cap, base * 2^(attempt - 1)) ms ("Exponential Backoff And Jitter",
-- AWS Architecture Blog, 2015).
WITH target AS (
    SELECT s.id, s.attempt, s.max_attempts,
           (%(retryable)s AND s.idempotent AND s.attempt < s.max_attempts) AS will_retry,
           least(%(backoff_cap_ms)s::float8,
                 %(backoff_base_ms)s::float8 * power(2, s.attempt - 1)) AS ceiling_ms
    FROM steps s
    WHERE s.id = %(id)s
      AND s.lease_token = %(token)s
      AND s.status = 'running'
      AND s.lease_expires_at > now()
    FOR UPDATE
), jittered AS (
    SELECT t.*, CASE WHEN t.will_retry THEN floor(random() * t.ceiling_ms) ELSE 0 END AS delay_ms
    FROM target t
), upd AS (
    UPDATE steps s
    SET status = CASE WHEN j.will_retry THEN 'ready' ELSE 'dead_letter' END,
        available_at = now() + make_interval(secs => j.delay_ms / 1000.0),
        error = %(error)s,
        finished_at = CASE WHEN j.will_retry THEN NULL ELSE now() END,
        lease_owner = NULL, lease_expires_at = NULL, updated_at = now()
    FROM jittered j
    WHERE s.id = j.id
    RETURNING s.id, s.run_id, s.name, s.status, s.attempt, s.max_attempts, s.lease_token,
              s.available_at, j.delay_ms, j.ceiling_ms
), audit AS (
    INSERT INTO audit_log (run_id, step_id, step_name, event, from_status, to_status,
                           attempt, lease_token, worker_id, detail)
    SELECT run_id, id, name,
           CASE WHEN status = 'ready' THEN 'step_retry_scheduled' ELSE 'step_dead_lettered' END,
           'running', status, attempt, lease_token, %(worker_id)s,
           jsonb_build_object('error', %(error)s::text, 'retryable', %(retryable)s::boolean,
                              'maxAttempts', max_attempts, 'backoffMs', delay_ms,
                              'backoffCeilingMs', ceiling_ms, 'availableAt', available_at)
    FROM upd
)
SELECT id, run_id, status, attempt, available_at, delay_ms FROM upd

-- name: release_steps
-- Graceful shutdown hands back attempts it will not finish: running -> ready at once with the
-- attempt unspent; an "idempotent": false step may have had its effect, so it goes to
-- dead_letter for a person to look at instead.
WITH upd AS (
    UPDATE steps s
    SET status = CASE WHEN s.idempotent THEN 'ready' ELSE 'dead_letter' END,
        attempt = CASE WHEN s.idempotent THEN s.attempt - 1 ELSE s.attempt END,
        available_at = now(),
        error = CASE WHEN s.idempotent THEN s.error
                     ELSE 'worker ' || %(worker_id)s || ' shut down while this step ran; '
                          || 'not re-run because the step is "idempotent": false' END,
        finished_at = CASE WHEN s.idempotent THEN NULL ELSE now() END,
        lease_owner = NULL, lease_expires_at = NULL, updated_at = now()
    FROM unnest(%(ids)s::bigint[], %(tokens)s::bigint[]) AS l(id, token)
    WHERE s.id = l.id AND s.lease_token = l.token AND s.status = 'running'
    RETURNING s.id, s.run_id, s.name, s.status, s.attempt, s.lease_token
), audit AS (
    INSERT INTO audit_log (run_id, step_id, step_name, event, from_status, to_status,
                           attempt, lease_token, worker_id, detail)
    SELECT run_id, id, name,
           CASE WHEN status = 'ready' THEN 'step_released' ELSE 'step_dead_lettered' END,
           'running', status, attempt, lease_token, %(worker_id)s,
           jsonb_build_object('reason', 'worker shutdown')
    FROM upd
)
SELECT id, run_id, status FROM upd

-- name: reap_expired_leases
-- The reaper: running steps whose lease expired on the database clock. Idempotent steps with
-- attempts left go back to ready at once; an "idempotent": false step, or one whose attempts
-- are spent, goes to dead_letter.
WITH expired AS (
    SELECT id, lease_owner, lease_expires_at
    FROM steps
    WHERE status = 'running' AND lease_expires_at <= now()
    ORDER BY lease_expires_at
    LIMIT %(limit)s
    FOR UPDATE SKIP LOCKED
), upd AS (
    UPDATE steps s
    SET status = CASE WHEN s.idempotent AND s.attempt < s.max_attempts THEN 'ready'
                      ELSE 'dead_letter' END,
        available_at = now(),
        error = CASE
            WHEN NOT s.idempotent THEN
                'lease expired while running on worker ' || coalesce(x.lease_owner, '?')
                || '; not re-run because the step is "idempotent": false (retry it by hand)'
            WHEN s.attempt >= s.max_attempts THEN
                'lease expired while running on worker ' || coalesce(x.lease_owner, '?')
                || ' and all ' || s.max_attempts || ' attempts are spent'
            ELSE 'lease expired while running on worker ' || coalesce(x.lease_owner, '?') END,
        finished_at = CASE WHEN s.idempotent AND s.attempt < s.max_attempts THEN NULL
                           ELSE now() END,
        lease_owner = NULL, lease_expires_at = NULL, updated_at = now()
    FROM expired x
    WHERE s.id = x.id
    RETURNING s.id, s.run_id, s.name, s.status, s.attempt, s.lease_token, x.lease_owner,
              x.lease_expires_at, s.error
), audit AS (
    INSERT INTO audit_log (run_id, step_id, step_name, event, from_status, to_status,
                           attempt, lease_token, worker_id, detail)
    SELECT run_id, id, name,
           CASE WHEN status = 'ready' THEN 'step_lease_expired' ELSE 'step_dead_lettered' END,
           'running', status, attempt, lease_token, lease_owner,
           jsonb_build_object('reason', 'lease expired', 'error', error,
                              'leaseExpiredAt', lease_expires_at)
    FROM upd
)
SELECT id, run_id, status FROM upd

-- name: reaper_try_lock
-- One reaper at a time across every worker and API process (transaction-scoped advisory
-- lock; the key is an arbitrary constant owned by pgdag).
SELECT pg_try_advisory_xact_lock(8210605541) AS acquired

-- name: prune_finished_runs
-- Retention: delete up to %(limit)s runs that finished more than %(retention_s)s seconds
-- ago, oldest first, with their steps (ON DELETE CASCADE), edges and audit rows (explicitly:
-- those tables have no foreign keys, see migration 0002). Runs another pruner holds are
-- skipped. Reads runs_finished_idx.
WITH old AS (
    SELECT id FROM runs
    WHERE finished_at < now() - make_interval(secs => %(retention_s)s)
      AND status IN ('completed', 'failed', 'cancelled')
    ORDER BY finished_at
    LIMIT %(limit)s
    FOR UPDATE SKIP LOCKED
), edges AS (
    DELETE FROM step_edges e USING steps s, old
    WHERE s.run_id = old.id AND e.parent_id = s.id
), audit AS (
    DELETE FROM audit_log a USING old WHERE a.run_id = old.id
)
DELETE FROM runs r USING old WHERE r.id = old.id
RETURNING r.id

-- name: skip_descendants
-- Dependents (transitively) of dead-lettered steps can never run: pending -> skipped.
WITH RECURSIVE down(id) AS (
    SELECT e.child_id FROM step_edges e WHERE e.parent_id = ANY(%(ids)s::bigint[])
    UNION
    SELECT e.child_id FROM step_edges e JOIN down d ON e.parent_id = d.id
), upd AS (
    UPDATE steps s
    SET status = 'skipped', finished_at = now(), updated_at = now(),
        error = 'skipped: an upstream step is in dead_letter'
    FROM down
    WHERE s.id = down.id AND s.status = 'pending'
    RETURNING s.id, s.run_id, s.name
), audit AS (
    INSERT INTO audit_log (run_id, step_id, step_name, event, from_status, to_status)
    SELECT run_id, id, name, 'step_skipped', 'pending', 'skipped' FROM upd
)
SELECT run_id, count(*)::integer AS n FROM upd GROUP BY run_id

-- name: settle_run
-- Count finished steps off a run and finish it when none is left: failed if any step is in
-- dead_letter, else completed.
WITH upd AS (
    UPDATE runs r
    SET steps_unfinished = r.steps_unfinished - %(finished)s,
        steps_dead = r.steps_dead + %(dead)s,
        status = CASE WHEN r.steps_unfinished - %(finished)s > 0 THEN r.status
                      WHEN r.steps_dead + %(dead)s > 0 THEN 'failed'
                      ELSE 'completed' END,
        finished_at = CASE WHEN r.steps_unfinished - %(finished)s = 0 THEN now() END,
        updated_at = now()
    WHERE r.id = %(run_id)s AND r.status IN ('pending', 'running')
    RETURNING r.id, r.status
), audit AS (
    INSERT INTO audit_log (run_id, event, from_status, to_status)
    SELECT id, 'run_' || status, 'running', status
    FROM upd WHERE status IN ('completed', 'failed')
)
SELECT id, status FROM upd

-- name: lock_run
SELECT id, status FROM runs WHERE id = %(run_id)s FOR UPDATE

-- name: cancel_run_steps
WITH upd AS (
    UPDATE steps s
    SET status = 'cancelled', finished_at = now(), updated_at = now(),
        lease_owner = NULL, lease_expires_at = NULL
    WHERE s.run_id = %(run_id)s AND s.status IN ('pending', 'ready', 'running')
    RETURNING s.id, s.run_id, s.name, s.attempt, s.lease_token,
              (SELECT status FROM steps o WHERE o.id = s.id) AS from_status
), audit AS (
    INSERT INTO audit_log (run_id, step_id, step_name, event, from_status, to_status,
                           attempt, lease_token, detail)
    SELECT run_id, id, name, 'step_cancelled', from_status, 'cancelled', attempt, lease_token,
           jsonb_build_object('reason', %(reason)s::text)
    FROM upd
)
SELECT count(*)::integer AS n FROM upd

-- name: cancel_run
WITH upd AS (
    UPDATE runs
    SET status = 'cancelled', steps_unfinished = 0, finished_at = now(), updated_at = now()
    WHERE id = %(run_id)s AND status IN ('pending', 'running')
    RETURNING id, (SELECT status FROM runs o WHERE o.id = %(run_id)s) AS from_status
), audit AS (
    INSERT INTO audit_log (run_id, event, from_status, to_status, detail)
    SELECT id, 'run_cancelled', from_status, 'cancelled',
           jsonb_build_object('reason', %(reason)s::text)
    FROM upd
)
SELECT id FROM upd

-- name: retry_dead_letter_step
-- dead_letter -> ready with attempts reset (a person's manual retry).
WITH upd AS (
    UPDATE steps s
    SET status = 'ready', attempt = 0, available_at = now(), error = NULL, output = NULL,
        finished_at = NULL, updated_at = now()
    WHERE s.run_id = %(run_id)s AND s.name = %(step_name)s AND s.status = 'dead_letter'
    RETURNING s.id, s.run_id, s.name
), audit AS (
    INSERT INTO audit_log (run_id, step_id, step_name, event, from_status, to_status, detail)
    SELECT run_id, id, name, 'step_retried', 'dead_letter', 'ready',
           jsonb_build_object('reason', 'manual retry')
    FROM upd
)
SELECT id FROM upd

-- name: unskip_descendants
-- After a manual retry of %(id)s: its skipped descendants return to pending, except those
-- that also descend from another step still in dead_letter.
WITH RECURSIVE down(id) AS (
    SELECT child_id FROM step_edges WHERE parent_id = %(id)s
    UNION
    SELECT e.child_id FROM step_edges e JOIN down d ON e.parent_id = d.id
), other_dead(id) AS (
    SELECT id FROM steps
    WHERE run_id = %(run_id)s AND status = 'dead_letter' AND id <> %(id)s
), still_blocked(id) AS (
    SELECT e.child_id FROM step_edges e JOIN other_dead o ON e.parent_id = o.id
    UNION
    SELECT e.child_id FROM step_edges e JOIN still_blocked b ON e.parent_id = b.id
), upd AS (
    UPDATE steps s
    SET status = 'pending', finished_at = NULL, error = NULL, updated_at = now()
    FROM down
    WHERE s.id = down.id AND s.status = 'skipped'
      AND s.id NOT IN (SELECT id FROM still_blocked)
    RETURNING s.id, s.run_id, s.name
), audit AS (
    INSERT INTO audit_log (run_id, step_id, step_name, event, from_status, to_status)
    SELECT run_id, id, name, 'step_unskipped', 'skipped', 'pending' FROM upd
)
SELECT count(*)::integer AS n FROM upd

-- name: reopen_run
-- A manual retry brings a run back: failed -> running, with the retried steps counted again.
WITH upd AS (
    UPDATE runs r
    SET steps_unfinished = r.steps_unfinished + %(reopened)s,
        steps_dead = r.steps_dead - 1,
        status = CASE WHEN r.status = 'failed' THEN 'running' ELSE r.status END,
        finished_at = NULL, updated_at = now()
    WHERE r.id = %(run_id)s
    RETURNING r.id, r.status, (SELECT status FROM runs o WHERE o.id = %(run_id)s) AS from_status
), audit AS (
    INSERT INTO audit_log (run_id, event, from_status, to_status)
    SELECT id, 'run_resumed', from_status, status FROM upd WHERE from_status <> status
)
SELECT id, status FROM upd

-- name: register_worker
INSERT INTO workers (id, hostname, pid, concurrency, tools, status, started_at,
                     last_heartbeat_at, stopped_at)
VALUES (%(id)s, %(hostname)s, %(pid)s, %(concurrency)s, %(tools)s, 'running', now(), now(), NULL)
ON CONFLICT (id) DO UPDATE
SET hostname = EXCLUDED.hostname, pid = EXCLUDED.pid, concurrency = EXCLUDED.concurrency,
    tools = EXCLUDED.tools, status = 'running', started_at = now(), last_heartbeat_at = now(),
    stopped_at = NULL

-- name: worker_heartbeat
UPDATE workers SET last_heartbeat_at = now(), status = %(status)s WHERE id = %(id)s

-- name: worker_stopped
UPDATE workers SET status = 'stopped', stopped_at = now(), last_heartbeat_at = now()
WHERE id = %(id)s

-- name: select_run
SELECT id, seq, goal, status, idempotency_key, steps_total, steps_unfinished, steps_dead,
       created_at, started_at, finished_at, updated_at
FROM runs WHERE id = %(run_id)s

-- name: select_step_status
SELECT status FROM steps WHERE run_id = %(run_id)s AND name = %(step_name)s

-- name: select_run_steps_json
-- Every step of the run as the API's JSON array, built here: for a 10,000-step run this is
-- 3 to 5 times faster than decoding the rows and encoding them again in Python (measured).
-- The one definition of a step's JSON shape.
SELECT coalesce(json_agg(json_build_object(
           'name', name, 'tool', tool, 'input', input, 'dependsOn', depends_on,
           'status', status, 'attempt', attempt, 'maxAttempts', max_attempts,
           'timeoutMs', timeout_ms, 'idempotent', idempotent,
           'idempotencyKey', run_id || ':' || name,
           'availableAt', available_at, 'leaseOwner', lease_owner,
           'leaseExpiresAt', lease_expires_at, 'output', output, 'error', error,
           'createdAt', created_at, 'startedAt', started_at, 'finishedAt', finished_at,
           'updatedAt', updated_at) ORDER BY id), '[]')::text AS steps
FROM steps WHERE run_id = %(run_id)s

-- name: select_run_status_counts
SELECT status, count(*)::integer AS n FROM steps WHERE run_id = %(run_id)s GROUP BY status

-- name: list_runs
-- Newest first, keyset-paginated on seq (cursor = the last seq seen).
SELECT id, seq, goal, status, idempotency_key, steps_total, steps_unfinished, steps_dead,
       created_at, started_at, finished_at, updated_at
FROM runs
WHERE (%(status)s::text IS NULL OR status = %(status)s)
  AND (%(cursor)s::bigint IS NULL OR seq < %(cursor)s)
ORDER BY seq DESC
LIMIT %(limit)s

-- name: list_run_events
SELECT id, run_id, step_id, step_name, event, from_status, to_status, attempt, lease_token,
       worker_id, detail, created_at
FROM audit_log
WHERE run_id = %(run_id)s AND id > %(after)s
ORDER BY id
LIMIT %(limit)s

-- name: list_workers
SELECT w.id, w.hostname, w.pid, w.concurrency, w.tools, w.status, w.started_at,
       w.last_heartbeat_at, w.stopped_at,
       (w.status <> 'stopped'
        AND w.last_heartbeat_at > now() - make_interval(secs => %(lease_ttl_s)s)) AS alive,
       coalesce(
           (SELECT jsonb_agg(jsonb_build_object(
                       'runId', s.run_id, 'stepName', s.name, 'attempt', s.attempt,
                       'leaseExpiresAt', s.lease_expires_at) ORDER BY s.id)
            FROM steps s
            WHERE s.status = 'running' AND s.lease_owner = w.id),
           '[]'::jsonb) AS current_steps
FROM workers w
ORDER BY w.last_heartbeat_at DESC
LIMIT 500

-- name: ping
SELECT 1 AS ok
