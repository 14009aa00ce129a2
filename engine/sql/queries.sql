-- Every query pgdag runs. Loaded by engine/sql/__init__.py; called only from engine/.
-- Status writes live only in the queries used by engine/transitions.py. Each one is guarded
-- (expected status, and for attempt writes the fencing token and the lease's owner: a token is
-- a sequential number anyone can guess, so an attempt is ended only by the worker that claimed
-- it) and writes its audit_log rows in the same statement or transaction; the audit_log
-- trigger sends the NOTIFY.
-- Times come from the database clock: now(), never a client's.

-- name: insert_run
-- A new run, or nothing when its idempotency key is already taken (then: select_run_by_key).
-- %(idempotency_fingerprint)s is the sha256 of the run's canonical JSON (engine.dag.RunSpec
-- .fingerprint), NULL without a key. %(trace_context)s is the run span's W3C carrier
-- (engine/tracing.py), NULL when tracing is off.
INSERT INTO runs (goal, idempotency_key, idempotency_fingerprint, steps_total, steps_unfinished,
                  priority, start_at, trace_context)
VALUES (%(goal)s, %(idempotency_key)s, %(idempotency_fingerprint)s, %(steps_total)s,
        %(steps_total)s, %(priority)s, %(start_at)s, %(trace_context)s::jsonb)
ON CONFLICT (idempotency_key) DO NOTHING
RETURNING id

-- name: select_run_by_key
-- The run a client idempotency key names, and the fingerprint of the payload it was created
-- with (NULL for a run created before migration 0005: the key alone decides).
SELECT id, idempotency_fingerprint FROM runs WHERE idempotency_key = %(idempotency_key)s

-- name: insert_steps
-- All steps of a run and their edges in one statement. %(steps)s is a JSON array of
-- engine.dag.StepSpec.to_row() objects. Roots are ready at once, or wait as pending (no
-- dependencies left) until %(start_at)s when the run has a start time in the future, plus
-- their delayMs (migration 0009) when they have one: promote_due_steps makes them ready then
-- (no audit row per parked root: run_created counts them in "delayed"). A wait step
-- (waitSignal, migration 0010) carries its timeout as its delayMs: a wait root parks until its
-- deadline like any delayed root. A step of kind run keeps its child-run template in
-- child_template (migration 0011). Each concurrency key's limit is upserted (one key has
-- one limit per run: engine.dag checks it; across runs the latest submitted wins).
WITH spec AS (
    SELECT s.name, s.tool, s.input, coalesce(s."dependsOn", '{}') AS depends_on,
           s."maxAttempts" AS max_attempts, s."timeoutMs" AS timeout_ms, s.idempotent,
           coalesce(s."runIf", 'all_succeeded') AS run_if, s.refs, s."refSteps" AS ref_steps, s.map,
           s."mapPath" AS map_path, s."concurrencyKey" AS concurrency_key,
           s."maxConcurrency" AS max_concurrency,
           coalesce(s."maySkipChildren", false) AS may_skip_children, s."delayMs" AS delay_ms,
           s."waitSignal" AS wait_signal, s."waitApproval" AS wait_approval,
           s.run AS child_template
    FROM jsonb_to_recordset(%(steps)s::jsonb) AS s(
        name text, tool text, input jsonb, "dependsOn" text[], "maxAttempts" integer,
        "timeoutMs" integer, idempotent boolean, "runIf" text, refs jsonb, "refSteps" text[],
        map text, "mapPath" jsonb, "concurrencyKey" text, "maxConcurrency" integer,
        "maySkipChildren" boolean, "delayMs" integer, "waitSignal" text, "waitApproval" boolean,
        run jsonb)
), timing AS (
    SELECT coalesce(%(start_at)s::timestamptz > now(), false) AS delayed,
           greatest(coalesce(%(start_at)s::timestamptz, now()), now()) AS available_at
), inserted AS (
    INSERT INTO steps (run_id, name, tool, input, depends_on, deps_remaining, status,
                       max_attempts, timeout_ms, idempotent, run_if, refs, ref_steps, map,
                       map_path, concurrency_key, max_concurrency, priority, available_at,
                       may_skip_children, delay_ms, wait_signal, wait_approval, child_template)
    SELECT %(run_id)s, name, tool, input, depends_on, cardinality(depends_on),
           CASE WHEN cardinality(depends_on) = 0 AND NOT t.delayed
                     AND coalesce(delay_ms, 0) = 0 THEN 'ready'
                ELSE 'pending' END,
           max_attempts, timeout_ms, idempotent, run_if, refs, ref_steps, map, map_path,
           concurrency_key, max_concurrency, %(priority)s,
           CASE WHEN cardinality(depends_on) = 0 AND delay_ms > 0
                THEN t.available_at + make_interval(secs => delay_ms / 1000.0)
                ELSE t.available_at END,
           may_skip_children, delay_ms, wait_signal, wait_approval, child_template
    FROM spec CROSS JOIN timing t
    RETURNING id, name, depends_on, status
), slots AS (
    INSERT INTO concurrency_slots (key, max_running)
    SELECT DISTINCT concurrency_key, max_concurrency FROM spec WHERE concurrency_key IS NOT NULL
    ON CONFLICT (key) DO UPDATE SET max_running = EXCLUDED.max_running
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
                          'ready', (SELECT count(*) FROM inserted WHERE status = 'ready'),
                          'delayed', (SELECT count(*) FROM inserted
                                      WHERE status = 'pending' AND cardinality(depends_on) = 0),
                          'priority', %(priority)s::integer,
                          'startAt', %(start_at)s::timestamptz)

-- name: claim_steps
-- ready -> running for up to %(limit)s steps whose backoff has passed and whose tool is one
-- of %(tools)s (the tools the claiming worker has loaded: a step is never handed to a worker
-- that cannot run it, whichever way it became ready: submitted, promoted, a map child,
-- released, reaped, retried), highest priority first, then oldest (FIFO within a priority).
-- In the same statement:
-- - steps with a concurrency key take a slot of concurrency_slots (pgdag_take_slots,
--   migration 0003: the slot row's UPDATE is re-checked on its newest version, so claimers
--   racing for the last slot cannot both get it; rows locked in key order); keys already
--   full are not picked at all;
-- - references in the input are resolved against the outputs of the steps they name (and a
--   map child's element) and stored with the attempt (resolved_input, and the audit row).
-- One ordered walk of steps_ready_idx (tool, priority DESC, available_at, id; migration
-- 0004) per tool of the worker, each taking at most %(limit)s rows with SKIP LOCKED
-- (pgdag_pick_ready, plpgsql: its plan is cached, this statement's is not), then the best
-- %(limit)s of those: a backlog of another tool's steps is never walked (a filter
-- on one walk of the whole ready index read every such row first: 87 ms per claim behind
-- 100,000 of them, docs/claim-plan.md). Rows locked by a walk but not among the best are
-- left unchanged and unlocked at commit. The MATERIALIZED CTE keeps LIMIT + SKIP LOCKED
-- from locking more rows than its walks return (PostgreSQL bug #15715).
-- pgdag_pick_ready is VOLATILE (it locks rows), so its walks see rows committed after this
-- statement's snapshot was taken. A row updated to ready meanwhile is fine (the UPDATE below
-- re-reads its newest version), but a row INSERTED meanwhile (a new run's root, a map child)
-- is invisible to the UPDATE: it would stay unclaimed while pgdag_take_slots had taken its
-- concurrency slot, never to be given back. The EXISTS, on this statement's snapshot, keeps
-- such rows out before any slot is taken; they stay ready for the next claim.
-- Each claimed step comes with its run's trace_context (migration 0008), the parent of the
-- attempt's span: one primary-key lookup of runs per distinct run of the claim, not per step
-- (claim_runs, MATERIALIZED). A run of many steps has its row updated by every completing
-- batch, and each lookup walks that row's chain of versions: joined per step, the claim of W1's
-- "steps" shape took 4.9 ms a call against 3.2 ms without the join (docs/benchmarks.md).
WITH picked AS MATERIALIZED (
    SELECT p.id, p.concurrency_key, p.priority, p.available_at
    FROM pgdag_pick_ready(%(tools)s::text[], %(limit)s) AS p
    WHERE EXISTS (SELECT 1 FROM steps v WHERE v.id = p.id)
    ORDER BY p.priority DESC, p.available_at, p.id
    LIMIT %(limit)s
), chosen AS (
    SELECT id FROM picked WHERE concurrency_key IS NULL
    UNION ALL
    SELECT pgdag_take_slots(array_agg(id ORDER BY priority DESC, available_at, id),
                            array_agg(concurrency_key ORDER BY priority DESC, available_at, id))
    FROM picked WHERE concurrency_key IS NOT NULL
    HAVING count(*) > 0
), claimed AS (
    UPDATE steps s
    SET status = 'running',
        attempt = s.attempt + 1,
        lease_token = nextval('lease_token_seq'),
        lease_owner = %(worker_id)s,
        lease_expires_at = now() + make_interval(secs => %(lease_ttl_s)s),
        started_at = now(),
        updated_at = now(),
        resolved_input = CASE WHEN s.refs IS NULL OR s.map_path IS NOT NULL THEN NULL
            ELSE pgdag_resolve_input(s.input, s.refs,
                     pgdag_ref_context(s.run_id, s.ref_steps)
                     || jsonb_build_object('item', s.map_item, 'index', s.map_index)) END
    FROM chosen
    WHERE s.id = chosen.id
    RETURNING s.id, s.run_id, s.name, s.tool, s.input, s.attempt, s.max_attempts,
              s.timeout_ms, s.idempotent, s.lease_token, s.lease_expires_at, s.resolved_input,
              extract(epoch FROM s.started_at - s.available_at)::float8 AS ready_wait_s,
              s.map_path IS NOT NULL AND s.map_width IS NULL AS map_expand,
              s.map_width IS NOT NULL AS map_join, s.may_skip_children
), started_runs AS (
    UPDATE runs r
    SET status = 'running', started_at = now(), updated_at = now()
    WHERE r.id IN (SELECT run_id FROM claimed) AND r.status = 'pending'
    RETURNING r.id
), audit AS (
    INSERT INTO audit_log (run_id, step_id, step_name, event, from_status, to_status,
                           attempt, lease_token, worker_id, detail)
    SELECT id, NULL::bigint, NULL::text, 'run_started', 'pending', 'running', NULL::integer,
           NULL::bigint, %(worker_id)s, NULL::jsonb
    FROM started_runs
    UNION ALL
    SELECT run_id, id, name, 'step_claimed', 'ready', 'running', attempt, lease_token,
           %(worker_id)s, resolved_input
    FROM claimed
), claim_runs AS MATERIALIZED (
    SELECT r.id, r.trace_context
    FROM runs r
    WHERE r.id IN (SELECT DISTINCT run_id FROM claimed)
)
SELECT c.*, cr.trace_context FROM claimed c JOIN claim_runs cr ON cr.id = c.run_id ORDER BY c.id

-- name: heartbeat_leases
-- Extend the leases this worker still holds. A lease whose token is not current, or which
-- has already expired on the database clock, is not extended: its id is missing from the
-- result and the worker must abandon that attempt. With %(owner)s (an agent's heartbeat over
-- the API), a lease is extended only for the worker that claimed it: a fencing token is a
-- small sequential number, so it is no secret.
UPDATE steps s
SET lease_expires_at = now() + make_interval(secs => %(lease_ttl_s)s)
FROM unnest(%(ids)s::bigint[], %(tokens)s::bigint[]) AS l(id, token)
WHERE s.id = l.id
  AND s.lease_token = l.token
  AND s.status = 'running'
  AND s.lease_expires_at > now()
  AND (%(owner)s::text IS NULL OR s.lease_owner = %(owner)s::text)
RETURNING s.id, s.lease_expires_at

-- name: complete_steps
-- running -> succeeded for each (id, token, output) whose lease is current, in one statement:
-- count each dependent down (pending and skipped ones: see below) and decide the ones whose
-- last dependency this was by their trigger rule (engine.rules.decide: ready, or skipped for
-- an any_failed step whose dependencies all succeeded), count the run down and finish it when
-- nothing is left, and audit all of it. A dependent decided ready that has a delayMs
-- (delay_ms > 0, migration 0009) is parked instead: it stays pending with no dependency left
-- and available_at = now() + its delay, audited step_delayed (pending -> pending, detail
-- reason "delay", delayMs, until; a wait step, migration 0010: reason "signal", signal,
-- until = its deadline); promote_due_steps makes it ready then (a wait step: never, see
-- time_out_wait_steps). A map step's join
-- (map_width set) is never delayed: its delay was slept once, before it expanded. A map step's own success is its join: its output is
-- its children's outputs in order, built here. Children are locked in id order so that two
-- completions sharing children cannot deadlock. Returns the steps recorded, then the
-- dependents it skipped (skipped = true), whose own dependents the caller must settle in
-- the same transaction (fail_dependents).
WITH done AS (
    UPDATE steps s
    SET status = 'succeeded',
        output = CASE WHEN s.map_width IS NULL THEN d.output
                      ELSE (SELECT coalesce(jsonb_agg(c.output ORDER BY c.map_index), '[]')
                            FROM steps c WHERE c.map_parent_id = s.id) END,
        error = NULL, finished_at = now(),
        lease_owner = NULL, lease_expires_at = NULL, updated_at = now()
    FROM unnest(%(ids)s::bigint[], %(tokens)s::bigint[], %(outputs)s::jsonb[])
         AS d(id, token, output)
    WHERE s.id = d.id
      AND s.lease_token = d.token
      AND s.status = 'running'
      AND s.lease_expires_at > now()
      AND s.lease_owner = %(worker_id)s::text
    RETURNING s.id, s.run_id, s.name, s.attempt, s.lease_token, %(worker_id)s::text AS worker_id
), child_counts AS (
    SELECT e.child_id, count(*)::integer AS n
    FROM step_edges e
    JOIN done ON e.parent_id = done.id
    GROUP BY e.child_id
), locked_children AS (
    -- skipped children are counted down too: a manual retry of the dead letter that skipped
    -- them recounts them, but a replay or retry may find them again
    -- (the count rides along, so that promoted joins one CTE, not two: no n x n loop)
    SELECT c.id, cc.n, c.status AS old_status,
           CASE WHEN c.status <> 'pending' OR c.deps_remaining - cc.n > 0 THEN c.status
                WHEN c.run_if = 'any_failed' AND c.deps_failed = 0 AND c.map_width IS NULL
                    THEN 'skipped'
                WHEN c.delay_ms > 0 AND c.map_width IS NULL THEN 'pending'  -- parked
                ELSE 'ready' END AS new_status,
           (c.status = 'pending' AND c.deps_remaining - cc.n = 0 AND c.delay_ms > 0
            AND c.map_width IS NULL
            AND NOT (c.run_if = 'any_failed' AND c.deps_failed = 0)) AS parked
    FROM steps c
    JOIN child_counts cc ON cc.child_id = c.id
    WHERE c.status IN ('pending', 'skipped')
    ORDER BY c.id
    FOR UPDATE OF c
), promoted AS (
    UPDATE steps c
    SET deps_remaining = c.deps_remaining - lc.n,
        status = lc.new_status,
        available_at = CASE WHEN lc.parked THEN now() + make_interval(secs => c.delay_ms / 1000.0)
                            ELSE now() END,
        finished_at = CASE WHEN lc.new_status = 'skipped' THEN coalesce(c.finished_at, now())
                           END,
        error = CASE WHEN lc.old_status = 'pending' AND lc.new_status = 'skipped'
                     THEN 'skipped: runIf any_failed, and every dependency succeeded'
                     ELSE c.error END,
        updated_at = now()
    FROM locked_children lc
    WHERE c.id = lc.id AND c.status IN ('pending', 'skipped')
    RETURNING c.id, c.run_id, c.name, c.status, lc.old_status, lc.parked, c.delay_ms,
              c.available_at, c.wait_signal
), run_counts AS (
    SELECT run_id, count(*)::integer AS n
    FROM (SELECT run_id FROM done
          UNION ALL
          SELECT run_id FROM promoted WHERE old_status = 'pending' AND status = 'skipped') f
    GROUP BY run_id
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
                           attempt, lease_token, worker_id, detail)
    SELECT run_id, id, name, 'step_succeeded', 'running', 'succeeded', attempt, lease_token,
           worker_id, NULL::jsonb
    FROM done
    UNION ALL
    SELECT run_id, id, name, 'step_' || status, 'pending', status, NULL, NULL, NULL, NULL
    FROM promoted WHERE old_status = 'pending' AND status IN ('ready', 'skipped')
    UNION ALL
    SELECT run_id, id, name, 'step_delayed', 'pending', 'pending', NULL, NULL, NULL,
           CASE WHEN wait_signal IS NULL
                THEN jsonb_build_object('reason', 'delay', 'delayMs', delay_ms, 'until', available_at)
                ELSE jsonb_build_object('reason', 'signal', 'signal', wait_signal,
                                        'until', available_at) END
    FROM promoted WHERE parked
    UNION ALL
    SELECT id, NULL, NULL, 'run_' || status, 'running', status, NULL, NULL, NULL, NULL
    FROM settled WHERE status IN ('completed', 'failed')
)
SELECT id, run_id, lease_token, false AS skipped FROM done
UNION ALL
SELECT id, run_id, NULL, true FROM promoted WHERE old_status = 'pending' AND status = 'skipped'

-- name: lock_adding_step
-- The first statement of a success that adds steps (engine.transitions.complete_adding_steps):
-- the attempt (%(id)s, %(token)s) must still be ours, under the same guard as complete_steps
-- (current token, running, lease live on the database clock, claimed by %(worker_id)s). Its
-- row is locked (steps first, then the run: the order complete_steps takes them in), so no
-- reaper or cancel can end it before this transaction commits. No row: the lease is lost.
SELECT s.id, s.run_id, s.name, s.attempt, r.priority, r.parent_run_id IS NOT NULL AS in_child_run
FROM steps s JOIN runs r ON r.id = s.run_id
WHERE s.id = %(id)s
  AND s.lease_token = %(token)s
  AND s.status = 'running'
  AND s.lease_expires_at > now()
  AND s.lease_owner = %(worker_id)s::text
FOR UPDATE OF s

-- name: select_run_step_names
-- Every step of a run: name, status and dependsOn, for validating steps added to it (read
-- under the run's lock, which every status write of the run's steps also ends up taking).
SELECT name, status, depends_on FROM steps WHERE run_id = %(run_id)s

-- name: insert_added_steps
-- Steps that the running step %(adder_id)s adds to its run (issue 15 part 5), inserted as
-- insert_steps inserts a run's steps (the same columns from the same StepSpec.to_row JSON),
-- in the transaction that then records the adder's success with complete_steps. A new step's
-- dependencies left (deps_remaining) are those not in %(done)s (the names of the run's steps
-- that succeeded); the adder itself is not done yet: complete_steps counts its dependents
-- down, and decides them by their trigger rule, right after this. A step with none left is
-- ready at once (audited step_ready, reason "added": the NOTIFY on pgdag_ready wakes the
-- claimers), or parked for its delayMs (pending, no dependency left, promote_due_steps). Edges
-- go to new and existing steps alike. The run counts the new steps (steps_total,
-- steps_unfinished) before the adder's success counts itself down, so the run cannot
-- complete with it. A step of kind run keeps its child-run template (child_template,
-- migration 0011), as insert_steps keeps it. One steps_added row on the adder says what was
-- added.
WITH spec AS (
    SELECT s.name, s.tool, s.input, coalesce(s."dependsOn", '{}') AS depends_on,
           s."maxAttempts" AS max_attempts, s."timeoutMs" AS timeout_ms, s.idempotent,
           coalesce(s."runIf", 'all_succeeded') AS run_if, s.refs, s."refSteps" AS ref_steps, s.map,
           s."mapPath" AS map_path, s."concurrencyKey" AS concurrency_key,
           s."maxConcurrency" AS max_concurrency,
           coalesce(s."maySkipChildren", false) AS may_skip_children, s."delayMs" AS delay_ms,
           s.run AS child_template,
           (SELECT count(*) FROM unnest(coalesce(s."dependsOn", '{}')) AS d(name)
            WHERE d.name <> ALL(%(done)s::text[]))::integer AS remaining
    FROM jsonb_to_recordset(%(steps)s::jsonb) AS s(
        name text, tool text, input jsonb, "dependsOn" text[], "maxAttempts" integer,
        "timeoutMs" integer, idempotent boolean, "runIf" text, refs jsonb, "refSteps" text[],
        map text, "mapPath" jsonb, "concurrencyKey" text, "maxConcurrency" integer,
        "maySkipChildren" boolean, "delayMs" integer, run jsonb)
), inserted AS (
    INSERT INTO steps (run_id, name, tool, input, depends_on, deps_remaining, status,
                       max_attempts, timeout_ms, idempotent, run_if, refs, ref_steps, map,
                       map_path, concurrency_key, max_concurrency, priority, available_at,
                       may_skip_children, delay_ms, child_template)
    SELECT %(run_id)s, name, tool, input, depends_on, remaining,
           CASE WHEN remaining = 0 AND coalesce(delay_ms, 0) = 0 THEN 'ready'
                ELSE 'pending' END,
           max_attempts, timeout_ms, idempotent, run_if, refs, ref_steps, map, map_path,
           concurrency_key, max_concurrency, %(priority)s,
           CASE WHEN remaining = 0 AND delay_ms > 0
                THEN now() + make_interval(secs => delay_ms / 1000.0)
                ELSE now() END,
           may_skip_children, delay_ms, child_template
    FROM spec
    RETURNING id, name, depends_on, status, deps_remaining, delay_ms, available_at
), slots AS (
    INSERT INTO concurrency_slots (key, max_running)
    SELECT DISTINCT concurrency_key, max_concurrency FROM spec WHERE concurrency_key IS NOT NULL
    ON CONFLICT (key) DO UPDATE SET max_running = EXCLUDED.max_running
), edges AS (
    INSERT INTO step_edges (parent_id, child_id)
    SELECT p.id, c.id
    FROM inserted c
    CROSS JOIN LATERAL unnest(c.depends_on) AS d(name)
    JOIN (SELECT id, name FROM inserted
          UNION ALL
          SELECT id, name FROM steps WHERE run_id = %(run_id)s) p ON p.name = d.name
    RETURNING 1
), counted AS (
    -- (a data-modifying CTE runs whether or not it is referenced)
    UPDATE runs r
    SET steps_total = r.steps_total + (SELECT count(*) FROM inserted),
        steps_unfinished = r.steps_unfinished + (SELECT count(*) FROM inserted),
        updated_at = now()
    WHERE r.id = %(run_id)s
    RETURNING r.id
)
INSERT INTO audit_log (run_id, step_id, step_name, event, from_status, to_status,
                       attempt, lease_token, worker_id, detail)
SELECT %(run_id)s, %(adder_id)s, %(adder_name)s, 'steps_added', 'running', 'running',
       %(attempt)s, %(token)s, %(worker_id)s,
       jsonb_build_object('steps', (SELECT jsonb_agg(name ORDER BY id) FROM inserted),
                          'edges', (SELECT count(*) FROM edges),
                          'ready', (SELECT count(*) FROM inserted WHERE status = 'ready'),
                          'delayed', (SELECT count(*) FROM inserted
                                      WHERE status = 'pending' AND deps_remaining = 0))
UNION ALL
SELECT %(run_id)s, id, name, 'step_ready', NULL, 'ready', NULL, NULL, NULL,
       jsonb_build_object('reason', 'added', 'by', %(adder_name)s::text)
FROM inserted WHERE status = 'ready'

-- name: select_steps_added
-- The names added by attempt (%(id)s, %(token)s), from its steps_added audit row: the answer
-- to a success with added steps repeated after an ambiguous commit.
SELECT a.detail -> 'steps' AS steps
FROM audit_log a
WHERE a.run_id = (SELECT s.run_id FROM steps s WHERE s.id = %(id)s)
  AND a.step_id = %(id)s AND a.lease_token = %(token)s AND a.event = 'steps_added'
ORDER BY a.id DESC
LIMIT 1

-- name: step_lease_state
-- What became of an attempt whose write matched nothing (lease lost, or an ambiguous commit
-- that did in fact land).
SELECT id, status, lease_token, lease_owner, lease_expires_at > now() AS lease_live
FROM steps WHERE id = %(id)s

-- name: steps_lease_state
-- The same for several attempts at once (a batch of successes of which some matched nothing).
SELECT id, tool, status, lease_token, lease_owner, lease_expires_at > now() AS lease_live,
       extract(epoch FROM now() - started_at)::float8 AS running_s
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
      AND s.lease_owner = %(worker_id)s::text
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
      AND s.lease_owner = %(worker_id)s::text
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
    RETURNING s.id, s.run_id, s.name, s.tool, s.status, s.attempt, s.lease_token,
              x.lease_owner, x.lease_expires_at, s.error
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
SELECT id, run_id, tool, status FROM upd

-- name: promote_due_steps
-- Parked steps whose time has come: pending -> ready, audited step_ready with the reason:
-- "delay" for a step with a delayMs (its dependencies done, or a root: its run started, then
-- it slept), "startAt" for a delayed root without one. The audit row's to_status 'ready'
-- makes the audit_log trigger NOTIFY pgdag_ready, which wakes the workers' claim loops and the
-- agents' long polls: a parked step starts at most one reaper interval
-- (PGDAG_REAPER_INTERVAL) after its time, plus a claim. Run by the reaper
-- pass (one process at a time), not by the claim: the claim is planned afresh on every call
-- (its LIMIT makes Postgres keep custom plans), and this CTE added a quarter to its planning
-- time (measured 1.33 -> 1.07 ms). steps_scheduled_idx. A wait step (migration 0010) is
-- never made ready: time_out_wait_steps, run just before in the same pass, fails it.
WITH due AS (
    SELECT id FROM steps
    WHERE status = 'pending' AND deps_remaining = 0 AND available_at <= now()
      AND wait_signal IS NULL  -- a due wait step timed out: time_out_wait_steps fails it
    ORDER BY available_at
    LIMIT %(limit)s
    FOR UPDATE SKIP LOCKED
), promoted AS (
    UPDATE steps s SET status = 'ready', available_at = now(), updated_at = now()
    FROM due WHERE s.id = due.id
    RETURNING s.id, s.run_id, s.name, s.delay_ms
), audit AS (
    INSERT INTO audit_log (run_id, step_id, step_name, event, from_status, to_status, detail)
    SELECT run_id, id, name, 'step_ready', 'pending', 'ready',
           CASE WHEN delay_ms > 0 THEN jsonb_build_object('reason', 'delay', 'delayMs', delay_ms)
                ELSE jsonb_build_object('reason', 'startAt') END
    FROM promoted
)
SELECT count(*)::integer AS n FROM promoted

-- name: reaper_try_lock
-- One reaper pass at a time (transaction-scoped advisory lock; the key is an arbitrary
-- constant owned by pgdag): only the maintenance leader reaps, this covers a hand-over. A
-- process that freezes inside the pass (SIGSTOP, a blocked event loop) would hold this lock
-- and the rows it locked for as long as it stays frozen, so the pass's transaction may sit
-- idle 5 s at most: then Postgres ends the session and the next leader's pass gets through
-- (measured: a leader frozen mid-pass had stopped all reaping until it was resumed).
SELECT set_config('idle_in_transaction_session_timeout', '5000', true) AS idle_limit,
       pg_try_advisory_xact_lock(8210605541) AS acquired

-- name: maintenance_work_due
-- The maintenance leader's look before each round (engine/maintenance/service.py), read only
-- and outside any transaction: for each task that can be skipped, whether its pass has a row
-- to take. The passes run every second on the leader's event loop, a worker's too, beside its
-- claims; with nothing due, a round is this one statement instead of twelve in three
-- transactions. Something that becomes due just after the look is taken by the next round,
-- as it would be after a full pass. Each EXISTS is the WHERE of the statement it stands for:
-- "reaper": a lease expired (reap_expired_leases, steps_lease_idx), a parked step's time has
--   come (promote_due_steps and time_out_wait_steps together, steps_scheduled_idx), or a kept
--   signal's wait step waits now (signals_to_deliver, signals_unconsumed_idx);
-- "child_runs": a step of kind run is due (select_due_child_steps, steps_ready_idx) or one's
--   child run has ended (select_finished_child_steps, steps_child_wait_idx);
-- "scheduler": a schedule not paused is due (lock_due_schedule, schedules_due_idx).
SELECT EXISTS (SELECT 1 FROM steps WHERE status = 'running' AND lease_expires_at <= now())
       OR EXISTS (SELECT 1 FROM steps
                  WHERE status = 'pending' AND deps_remaining = 0 AND available_at <= now())
       OR EXISTS (SELECT 1
                  FROM signals g
                  JOIN steps s ON s.run_id = g.run_id AND s.wait_signal = g.name
                  JOIN runs r ON r.id = g.run_id
                  WHERE g.consumed_at IS NULL AND s.status = 'pending' AND s.deps_remaining = 0
                    AND (r.start_at IS NULL OR r.start_at <= now()))
           AS reaper,
       EXISTS (SELECT 1 FROM steps s
               WHERE s.tool = '$run' AND s.status = 'ready' AND s.available_at <= now()
                 AND s.child_template IS NOT NULL)
       OR EXISTS (SELECT 1 FROM steps s JOIN runs c ON c.id = s.child_run_id
                  WHERE s.child_run_id IS NOT NULL AND s.status = 'running'
                    AND c.status IN ('completed', 'failed', 'cancelled'))
           AS child_runs,
       EXISTS (SELECT 1 FROM schedules WHERE NOT paused AND next_fire_at <= now())
           AS scheduler

-- name: maintenance_try_lock
-- Leadership of the maintenance service (engine.maintenance): a SESSION advisory lock, held
-- on one dedicated connection for as long as that session lives. Postgres releases it when
-- the session ends (the process died, its connection closed). The key is a constant owned by
-- pgdag (not the reaper's transaction lock above, nor the audit upkeep's 8210605542 of
-- migration 0007).
SELECT pg_try_advisory_lock(8210605543) AS acquired

-- name: maintenance_ping
-- The leader's check, each tick, that its lock connection (so its lock) is still there.
SELECT 1 AS ok

-- name: maintenance_session_guard
-- On the lock connection: Postgres ends this session (and so releases the lock) when it sits
-- idle longer than %(idle_ms)s ms, that is when its process froze or hung, and probes the
-- client with TCP keepalives so a vanished host is noticed in about 5 + 3 x 2 seconds.
SELECT set_config('idle_session_timeout', %(idle_ms)s::text, false),
       set_config('tcp_keepalives_idle', '5', false),
       set_config('tcp_keepalives_interval', '2', false),
       set_config('tcp_keepalives_count', '3', false)

-- name: maintenance_leader
-- Who holds the maintenance lock, from any process: the session's application_name (set to
-- "pgdag-maintenance <holder>") and backend pid. An advisory lock on a bigint key shows in
-- pg_locks as classid = its high 32 bits, objid = its low 32 bits, objsubid = 1.
SELECT a.application_name, l.pid, a.backend_start
FROM pg_locks l
JOIN pg_stat_activity a ON a.pid = l.pid
WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 1
  AND l.classid = (8210605543::bigint >> 32)::oid
  AND l.objid = (8210605543::bigint & 4294967295)::oid

-- name: stale_workers
-- Workers that are not stopped but whose last heartbeat is older than %(limit_s)s seconds
-- (the lease TTL: GET /workers shows them alive = false): gone without saying so. The workers
-- table holds one row per worker id, so this reads a small table.
SELECT id, kind, hostname, pid, last_heartbeat_at,
       extract(epoch FROM now() - last_heartbeat_at)::float8 AS silent_s
FROM workers
WHERE status <> 'stopped'
  AND last_heartbeat_at <= now() - make_interval(secs => %(limit_s)s)
ORDER BY last_heartbeat_at
LIMIT 1000

-- name: prune_finished_runs
-- Retention: delete up to %(limit)s runs that finished more than %(retention_s)s seconds
-- ago, oldest first, with their steps (ON DELETE CASCADE) and edges (explicitly: step_edges
-- has no foreign keys, see migration 0002). Their audit rows are not deleted here: they go
-- with their day's audit_log partition (maintain_audit_partitions, migration 0007), every
-- one of them being older than the run's finish. Runs another pruner holds are skipped.
-- Reads runs_finished_idx.
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
)
DELETE FROM runs r USING old WHERE r.id = old.id
RETURNING r.id

-- name: maintain_audit_partitions
-- Audit-log partition upkeep (migration 0007, pgdag_maintain_audit_partitions_v1): create
-- the partitions of today and the next %(ahead_days)s days (UTC), drop those whose every row
-- is older than %(retention_s)s seconds (NULL: drop nothing), each DDL waiting at most
-- %(lock_timeout_ms)s ms for its lock. Serialized between processes by an advisory lock.
-- One row per thing done: action (created, dropped, deleted, deferred), partition_name,
-- n_rows (created: rows moved from the DEFAULT partition; deleted: rows of DEFAULT).
SELECT action, partition_name, n_rows
FROM pgdag_maintain_audit_partitions_v1(
    make_interval(secs => %(retention_s)s::double precision), %(ahead_days)s::integer,
    %(lock_timeout_ms)s::integer)

-- name: list_audit_partitions
-- The audit_log partitions, oldest first: name, bounds (NULL for DEFAULT), rows (estimate
-- from the statistics: never a count), bytes.
SELECT c.relname AS partition_name,
       substring(pg_get_expr(c.relpartbound, c.oid) FROM 'FROM \(''([^'']+)''\)')
           ::timestamptz AS lower_bound,
       substring(pg_get_expr(c.relpartbound, c.oid) FROM 'TO \(''([^'']+)''\)')
           ::timestamptz AS upper_bound,
       greatest(c.reltuples, 0)::bigint AS rows_estimate,
       pg_total_relation_size(c.oid) AS total_bytes
FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
WHERE i.inhparent = 'audit_log'::regclass
ORDER BY lower_bound NULLS LAST

-- name: fail_dependents
-- Steps %(ids)s ended without succeeding (dead_letter or skipped): count each direct
-- dependent down and up its failed count, and decide it by its trigger rule
-- (engine.rules.decide): an all_succeeded step (and a map step waiting for its children) is
-- skipped at once; an all_done or any_failed one becomes ready when this was its last
-- dependency, and keeps waiting otherwise; one with a delayMs is parked then instead, as in
-- complete_steps (pending, available_at = now() + delay, audited step_delayed). Skipped
-- dependents are counted too (the retry of a dead letter recounts them). Returns the dependents whose status changed; the caller
-- repeats this for the ones it skipped, in the same transaction, and settles their runs.
WITH child_counts AS (
    SELECT e.child_id, count(*)::integer AS n
    FROM step_edges e WHERE e.parent_id = ANY(%(ids)s::bigint[])
    GROUP BY e.child_id
), locked AS (
    SELECT c.id, cc.n, c.status AS old_status,
           CASE WHEN c.status <> 'pending' THEN c.status
                WHEN c.run_if = 'all_succeeded' OR c.map_width IS NOT NULL THEN 'skipped'
                WHEN c.deps_remaining - cc.n > 0 THEN 'pending'
                WHEN c.delay_ms > 0 THEN 'pending'  -- parked
                ELSE 'ready' END AS new_status,
           (c.status = 'pending' AND c.run_if <> 'all_succeeded' AND c.map_width IS NULL
            AND c.deps_remaining - cc.n = 0 AND c.delay_ms > 0) AS parked
    FROM steps c
    JOIN child_counts cc ON cc.child_id = c.id
    WHERE c.status IN ('pending', 'skipped')
    ORDER BY c.id
    FOR UPDATE OF c
), upd AS (
    UPDATE steps s
    SET deps_remaining = s.deps_remaining - l.n,
        deps_failed = s.deps_failed + l.n,
        status = l.new_status,
        available_at = CASE WHEN l.parked THEN now() + make_interval(secs => s.delay_ms / 1000.0)
                            ELSE now() END,
        finished_at = CASE WHEN l.new_status = 'skipped' THEN coalesce(s.finished_at, now()) END,
        error = CASE WHEN l.old_status = 'skipped' THEN s.error
                     WHEN l.new_status <> 'skipped' THEN NULL
                     WHEN s.map_width IS NOT NULL THEN 'skipped: a map child did not succeed'
                     ELSE 'skipped: a dependency did not succeed (runIf all_succeeded)' END,
        updated_at = now()
    FROM locked l
    WHERE s.id = l.id AND s.status IN ('pending', 'skipped')
    RETURNING s.id, s.run_id, s.name, s.status, l.old_status, l.parked, s.delay_ms,
              s.available_at, s.wait_signal
), audit AS (
    INSERT INTO audit_log (run_id, step_id, step_name, event, from_status, to_status, detail)
    SELECT run_id, id, name, 'step_' || status, old_status, status, NULL::jsonb
    FROM upd WHERE status <> old_status
    UNION ALL
    SELECT run_id, id, name, 'step_delayed', 'pending', 'pending',
           CASE WHEN wait_signal IS NULL
                THEN jsonb_build_object('reason', 'delay', 'delayMs', delay_ms, 'until', available_at)
                ELSE jsonb_build_object('reason', 'signal', 'signal', wait_signal,
                                        'until', available_at) END
    FROM upd WHERE parked
)
SELECT id, run_id, status FROM upd WHERE status <> old_status

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
SELECT id, status, coalesce(start_at > now(), false) AS delayed
FROM runs WHERE id = %(run_id)s FOR UPDATE

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
    -- the token only of an attempt this ends: a ready step waiting out a retry keeps its
    -- last attempt's token, which that attempt's end already carried
    SELECT run_id, id, name, 'step_cancelled', from_status, 'cancelled', attempt,
           CASE WHEN from_status = 'running' THEN lease_token END,
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

-- name: select_unfinished_child_runs
-- The unfinished child runs of a run being cancelled (runs_parent_idx, migration 0011),
-- locked in id order like lock_run: cancel_run cancels them in its own transaction.
SELECT id FROM runs
WHERE parent_run_id = %(run_id)s AND status IN ('pending', 'running')
ORDER BY id
FOR UPDATE

-- name: select_run_graph
-- A run's steps, for engine.transitions' reset (manual retry and replay), which evaluates
-- the trigger rules of the steps it resets in Python (engine.rules) under the run's lock.
-- Every step row is locked (in id order, like complete_steps' children) until the reset
-- commits: a claim skips them and a completion waits, so nothing the plan was made from can
-- change under it (a replay once reset a step a worker had claimed meanwhile).
SELECT id, name, status, run_if, map_path IS NOT NULL AS is_map, map_width, map_parent_id,
       lease_owner, attempt, delay_ms, wait_signal IS NOT NULL AS waits
FROM steps WHERE run_id = %(run_id)s
ORDER BY id
FOR UPDATE

-- name: select_run_edges
SELECT e.parent_id, e.child_id
FROM step_edges e JOIN steps s ON s.id = e.child_id
WHERE s.run_id = %(run_id)s

-- name: delete_map_children
-- A map step being replayed drops the children of its last expansion (it expands again when
-- it next runs), with their edges and audit rows (never running: the caller checks).
WITH gone AS (
    DELETE FROM steps s WHERE s.map_parent_id = ANY(%(ids)s::bigint[])
    RETURNING s.id
), edges AS (
    DELETE FROM step_edges e USING gone WHERE e.child_id = gone.id OR e.parent_id = gone.id
), audit AS (
    DELETE FROM audit_log a USING gone WHERE a.run_id = %(run_id)s AND a.step_id = gone.id
)
SELECT count(*)::integer AS n FROM gone

-- name: reset_steps
-- Reset steps for a manual retry or a replay: each (id, status, deps_remaining, deps_failed)
-- was decided by engine.rules under the run's lock; attempts, outputs, errors and leases are
-- cleared, an unexpanded map step forgets its width. A step still pending with nothing left
-- to wait for is parked (engine.rules.plan_reset decided it): a delayed root waits for the
-- run's start time, and a step with a delayMs sleeps it again from then (or from now),
-- which its audit detail says (delayMs, until). Audits the steps whose status changed with
-- %(events)s and the reason.
WITH u AS (
    SELECT * FROM unnest(%(ids)s::bigint[], %(statuses)s::text[], %(remaining)s::integer[],
                         %(failed)s::integer[], %(events)s::text[], %(unexpand)s::boolean[])
             AS u(id, status, remaining, failed, event, unexpand)
), old AS (
    SELECT s.id, s.status FROM steps s JOIN u ON u.id = s.id ORDER BY s.id FOR UPDATE OF s
), upd AS (
    UPDATE steps s
    SET status = u.status, deps_remaining = u.remaining, deps_failed = u.failed, attempt = 0,
        output = NULL, resolved_input = NULL,
        error = CASE WHEN u.status <> 'skipped' THEN NULL
                     WHEN old.status = 'skipped' THEN s.error
                     ELSE 'skipped: a dependency did not succeed' END,
        map_width = CASE WHEN u.unexpand THEN NULL ELSE s.map_width END,
        available_at = CASE WHEN u.status = 'pending' AND u.remaining = 0
                            THEN greatest(coalesce(r.start_at, now()), now())
                                 + make_interval(secs => coalesce(s.delay_ms, 0) / 1000.0)
                            ELSE now() END,
        lease_owner = NULL, lease_expires_at = NULL, started_at = NULL,
        finished_at = CASE WHEN u.status = 'skipped' THEN now() END,
        updated_at = now()
    FROM u, old, runs r
    WHERE s.id = u.id AND old.id = u.id AND r.id = s.run_id
    RETURNING s.id, s.run_id, s.name, s.status, old.status AS from_status, u.event,
              s.delay_ms, s.available_at, u.remaining
), audit AS (
    INSERT INTO audit_log (run_id, step_id, step_name, event, from_status, to_status, detail)
    SELECT run_id, id, name, event, from_status, status,
           jsonb_build_object('reason', %(reason)s::text, 'from', %(from_step)s::text)
           || CASE WHEN status = 'pending' AND remaining = 0 AND delay_ms > 0
                   THEN jsonb_build_object('delayMs', delay_ms, 'until', available_at)
                   ELSE '{}'::jsonb END
    FROM upd WHERE status <> from_status OR event = 'step_replayed'
)
SELECT count(*)::integer AS n FROM upd

-- name: recount_run
-- After a reset: the run's counters from its steps, and its status from them (pending if it
-- never started, running while anything is unfinished). Audited with %(event)s.
WITH c AS (
    SELECT count(*)::integer AS total,
           (count(*) FILTER (WHERE status IN ('pending', 'ready', 'running')))::integer
               AS unfinished,
           (count(*) FILTER (WHERE status = 'dead_letter'))::integer AS dead
    FROM steps WHERE run_id = %(run_id)s
), upd AS (
    UPDATE runs r
    SET steps_total = c.total, steps_unfinished = c.unfinished, steps_dead = c.dead,
        status = CASE WHEN c.unfinished = 0 AND c.dead > 0 THEN 'failed'
                      WHEN c.unfinished = 0 THEN 'completed'
                      WHEN r.started_at IS NULL THEN 'pending'
                      ELSE 'running' END,
        finished_at = CASE WHEN c.unfinished = 0 THEN coalesce(r.finished_at, now()) END,
        updated_at = now()
    FROM c
    WHERE r.id = %(run_id)s
    RETURNING r.id, r.status, (SELECT status FROM runs o WHERE o.id = %(run_id)s) AS from_status
), audit AS (
    INSERT INTO audit_log (run_id, event, from_status, to_status, detail)
    SELECT id, %(event)s, from_status, status,
           jsonb_build_object('reason', %(reason)s::text, 'from', %(from_step)s::text)
    FROM upd WHERE from_status <> status OR %(event)s = 'run_replayed'
)
SELECT id, status, from_status FROM upd

-- name: select_dead_letters
-- Dead letters for a bulk retry, oldest first: filtered by tool, by their run's status and by
-- when they were dead-lettered (finished_at); steps_dead_letter_idx. Runs that were
-- cancelled are left out (their steps cannot be retried).
SELECT s.run_id, s.name, s.tool, s.finished_at
FROM steps s JOIN runs r ON r.id = s.run_id
WHERE s.status = 'dead_letter'
  AND r.status <> 'cancelled'
  AND (%(tool)s::text IS NULL OR s.tool = %(tool)s)
  AND (%(run_status)s::text IS NULL OR r.status = %(run_status)s)
  AND (%(since)s::timestamptz IS NULL OR s.finished_at >= %(since)s)
  AND (%(until)s::timestamptz IS NULL OR s.finished_at < %(until)s)
ORDER BY s.finished_at, s.id
LIMIT %(limit)s

-- name: expand_map
-- A claimed map step expands: its source ($ref, map_path) is resolved against the outputs
-- of the steps it names; it must be an array of at most %(max_width)s elements. Each element
-- becomes a ready child "<name>[<index>]" with the step's tool, input, limits and key; the
-- step waits for its children as if they were its dependencies (edges child -> step), and
-- its next claim is its join (complete_steps builds the output). No children: the join is
-- ready at once. Returns the width, or the problem when the source does not fit (nothing is
-- written then; the caller fails the attempt, not retryable). Guarded by the lease token.
WITH target AS (
    SELECT s.id, s.run_id, s.name, s.map, s.attempt, s.lease_token,
           pgdag_resolve_input('{"items": null}'::jsonb,
               jsonb_build_array(jsonb_build_object('at', '["items"]'::jsonb,
                   'path', s.map_path, 'ref', s.map, 'field', 'map')),
               pgdag_ref_context(s.run_id, ARRAY[s.map_path ->> 1])) AS src
    FROM steps s
    WHERE s.id = %(id)s AND s.lease_token = %(token)s AND s.status = 'running'
      AND s.lease_expires_at > now() AND s.lease_owner = %(worker_id)s::text
      AND s.map_path IS NOT NULL AND s.map_width IS NULL
    FOR UPDATE
), checked AS (
    SELECT t.*, t.src -> 'input' -> 'items' AS items,
           CASE WHEN t.src ? 'error' THEN t.src ->> 'error'
                WHEN jsonb_typeof(t.src -> 'input' -> 'items') <> 'array'
                    THEN format('map: $ref %%s is %%s, not an array', t.map,
                                jsonb_typeof(t.src -> 'input' -> 'items'))
                WHEN jsonb_array_length(t.src -> 'input' -> 'items') > %(max_width)s
                    THEN format('map: $ref %%s has %%s elements, over the fan-out cap of %%s '
                                '(PGDAG_MAX_MAP_WIDTH)', t.map,
                                jsonb_array_length(t.src -> 'input' -> 'items'), %(max_width)s)
           END AS problem
    FROM target t
), children AS (
    INSERT INTO steps (run_id, name, tool, input, depends_on, deps_remaining, status,
                       max_attempts, timeout_ms, idempotent, refs, ref_steps, priority,
                       concurrency_key, max_concurrency, map_parent_id, map_index, map_item)
    SELECT m.run_id, m.name || '[' || (e.ord - 1) || ']', m.tool, m.input, '{}', 0, 'ready',
           m.max_attempts, m.timeout_ms, m.idempotent, m.refs, m.ref_steps, m.priority,
           m.concurrency_key, m.max_concurrency, m.id, (e.ord - 1)::integer, e.value
    FROM checked c
    JOIN steps m ON m.id = c.id
    CROSS JOIN LATERAL jsonb_array_elements(c.items) WITH ORDINALITY AS e(value, ord)
    WHERE c.problem IS NULL
    RETURNING id, map_parent_id
), edges AS (
    INSERT INTO step_edges (parent_id, child_id)
    SELECT id, map_parent_id FROM children
), width AS (
    SELECT c.id, c.run_id, c.name, c.attempt, c.lease_token, c.map, c.problem,
           CASE WHEN c.problem IS NULL THEN jsonb_array_length(c.items) END AS n
    FROM checked c
), expanded AS (
    UPDATE steps s
    SET status = CASE WHEN w.n > 0 THEN 'pending' ELSE 'ready' END,
        deps_remaining = w.n, deps_failed = 0, map_width = w.n, available_at = now(),
        attempt = s.attempt - 1,  -- expanding ran no tool: the join's claim is the attempt
        lease_owner = NULL, lease_expires_at = NULL, updated_at = now()
    FROM width w
    WHERE s.id = w.id AND w.problem IS NULL
    RETURNING s.id, s.run_id, s.name, s.status, s.attempt, s.lease_token, w.n, w.map
), counted AS (
    UPDATE runs r
    SET steps_total = r.steps_total + e.n, steps_unfinished = r.steps_unfinished + e.n,
        updated_at = now()
    FROM expanded e WHERE r.id = e.run_id
), audit AS (
    INSERT INTO audit_log (run_id, step_id, step_name, event, from_status, to_status,
                           attempt, lease_token, worker_id, detail)
    SELECT run_id, id, name, 'step_map_expanded', 'running', status, attempt, lease_token,
           %(worker_id)s, jsonb_build_object('width', n, 'map', map)
    FROM expanded
)
SELECT w.id, w.n AS width, w.problem FROM width w

-- name: select_due_child_steps
-- Ready steps of kind run (tool '$run', engine.dag.CHILD_RUN_TOOL: no worker or agent can
-- load it) whose time has come, for the maintenance leader (engine/maintenance/child_runs.py),
-- highest priority first, then oldest, through steps_ready_idx (its leading column is the
-- tool). Locked, SKIP LOCKED, until the transaction that starts each one's child commits.
-- resolved_input is the step's input with its references resolved, as claim_steps resolves
-- them: {"input": ...} or {"error": ...}.
SELECT s.id, s.run_id, s.name, s.attempt, s.child_template, r.goal,
       CASE WHEN s.refs IS NULL THEN jsonb_build_object('input', s.input)
            ELSE pgdag_resolve_input(s.input, s.refs, pgdag_ref_context(s.run_id, s.ref_steps))
       END AS resolved_input
FROM steps s
JOIN runs r ON r.id = s.run_id
WHERE s.tool = '$run' AND s.status = 'ready' AND s.available_at <= now()
  AND s.child_template IS NOT NULL AND (%(id)s::bigint IS NULL OR s.id = %(id)s::bigint)
ORDER BY s.priority DESC, s.available_at, s.id
LIMIT %(limit)s
FOR UPDATE OF s SKIP LOCKED

-- name: next_lease_token
-- A fencing token taken before its claim: a run step's child run is keyed by it
-- (engine.transitions.start_child_runs), then start_child_run_step claims with it.
SELECT nextval('lease_token_seq') AS token

-- name: start_child_run_step
-- ready -> running for a step of kind run whose child run %(child_run_id)s was just inserted
-- in the same transaction (engine.transitions.start_child_runs; NULL: none could be, and the
-- attempt fails next, in the same transaction): a new attempt, fencing token %(token)s
-- (next_lease_token), the lease held by %(owner)s (the maintenance leader's name for it) until the child
-- ends, so it never expires (100 years: a finite time, which JSON and Python can read) and
-- the reaper never takes it; the child's id kept in child_run_id. Its run starts if it had
-- not. Audited step_claimed (detail: childRunId, the resolved input) and run_started.
WITH claimed AS (
    UPDATE steps s
    SET status = 'running', attempt = s.attempt + 1,
        lease_token = %(token)s,
        lease_owner = %(owner)s,
        lease_expires_at = now() + interval '100 years',
        started_at = now(), updated_at = now(),
        child_run_id = %(child_run_id)s,
        resolved_input = CASE WHEN s.refs IS NULL THEN NULL ELSE %(resolved_input)s::jsonb END
    WHERE s.id = %(id)s AND s.status = 'ready' AND s.attempt = %(attempt)s
    RETURNING s.id, s.run_id, s.name, s.attempt, s.lease_token
), started_runs AS (
    UPDATE runs r
    SET status = 'running', started_at = now(), updated_at = now()
    WHERE r.id IN (SELECT run_id FROM claimed) AND r.status = 'pending'
    RETURNING r.id
), audit AS (
    INSERT INTO audit_log (run_id, step_id, step_name, event, from_status, to_status,
                           attempt, lease_token, worker_id, detail)
    SELECT id, NULL::bigint, NULL::text, 'run_started', 'pending', 'running', NULL::integer,
           NULL::bigint, %(owner)s, NULL::jsonb
    FROM started_runs
    UNION ALL
    SELECT run_id, id, name, 'step_claimed', 'ready', 'running', attempt, lease_token,
           %(owner)s, jsonb_build_object('childRunId', %(child_run_id)s::uuid)
                      || %(resolved_input)s::jsonb
    FROM claimed
)
SELECT id, run_id, attempt, lease_token FROM claimed

-- name: link_child_run
-- A child run just inserted (create_run, same transaction) learns its parent run and step.
UPDATE runs SET parent_run_id = %(parent_run_id)s, parent_step_id = %(parent_step_id)s
WHERE id = %(child_run_id)s
RETURNING id

-- name: select_finished_child_steps
-- Steps of kind run still running whose child run has ended (steps_child_wait_idx, migration
-- 0011): the maintenance leader succeeds or fails each with its child's outcome. With the
-- child's outputs (each succeeded step's output by name; map children left out: their map
-- step's output holds them) and its first dead letter's error.
SELECT s.id, s.run_id, s.name, s.lease_token, s.attempt, c.id AS child_run_id,
       c.status AS child_status,
       (SELECT coalesce(jsonb_object_agg(cs.name, cs.output), '{}'::jsonb)
        FROM steps cs
        WHERE cs.run_id = c.id AND cs.status = 'succeeded' AND cs.map_parent_id IS NULL)
           AS child_outputs,
       (SELECT cs.name || ': ' || coalesce(cs.error, cs.status)
        FROM steps cs WHERE cs.run_id = c.id AND cs.status = 'dead_letter'
        ORDER BY cs.finished_at, cs.id LIMIT 1) AS child_error
FROM steps s
JOIN runs c ON c.id = s.child_run_id
WHERE s.child_run_id IS NOT NULL AND s.status = 'running'
  AND c.status IN ('completed', 'failed', 'cancelled')
ORDER BY s.id
LIMIT %(limit)s

-- name: register_worker
INSERT INTO workers (id, hostname, pid, concurrency, tools, kind, restarts, last_exit_code,
                     status, started_at, last_heartbeat_at, stopped_at)
VALUES (%(id)s, %(hostname)s, %(pid)s, %(concurrency)s, %(tools)s, %(kind)s, %(restarts)s,
        %(last_exit_code)s, 'running', now(), now(), NULL)
ON CONFLICT (id) DO UPDATE
SET hostname = EXCLUDED.hostname, pid = EXCLUDED.pid, concurrency = EXCLUDED.concurrency,
    tools = EXCLUDED.tools, kind = EXCLUDED.kind, restarts = EXCLUDED.restarts,
    last_exit_code = EXCLUDED.last_exit_code, status = 'running', started_at = now(),
    last_heartbeat_at = now(), stopped_at = NULL

-- name: worker_heartbeat
UPDATE workers SET last_heartbeat_at = now(), status = %(status)s WHERE id = %(id)s

-- name: agent_touch
-- An agent's request (claim, heartbeat) refreshes its row; no row means it never registered
-- (or said it stopped): the API answers 409 agent_not_registered.
UPDATE workers SET last_heartbeat_at = now(), status = 'running'
WHERE id = %(id)s AND kind = 'agent' AND status <> 'stopped'
RETURNING id

-- name: live_worker_tools
-- The tools of every live worker and agent (not stopped, heartbeat within %(lease_ttl_s)s):
-- POST /runs accepts a step of a tool the API has not loaded when one of them has it.
SELECT coalesce(array_agg(DISTINCT t), '{}') AS tools
FROM workers w CROSS JOIN LATERAL unnest(w.tools) AS t
WHERE w.status <> 'stopped'
  AND w.last_heartbeat_at > now() - make_interval(secs => %(lease_ttl_s)s)

-- name: attempt_failure_recorded
-- Whether the failure of attempt (%(id)s, %(token)s) was recorded already by %(worker_id)s
-- (fail_attempt's audit row): an agent re-sending a failed outcome whose answer it lost is
-- told so instead of lease_lost. Read only; walks the run's audit rows (audit_log_run_idx).
SELECT a.to_status, a.detail ->> 'availableAt' AS available_at
FROM audit_log a
WHERE a.run_id = (SELECT s.run_id FROM steps s WHERE s.id = %(id)s)
  AND a.step_id = %(id)s
  AND a.lease_token = %(token)s
  AND a.worker_id = %(worker_id)s
  AND a.from_status = 'running'
  AND a.event IN ('step_retry_scheduled', 'step_dead_lettered')
ORDER BY a.id DESC
LIMIT 1

-- name: attempt_success_recorded
-- Whether the success of attempt (%(id)s, %(token)s) was recorded by %(worker_id)s
-- (complete_steps' audit row): a re-sent success whose answer was lost is a duplicate only for
-- the worker that recorded it. Read only; walks the run's audit rows (audit_log_run_idx).
SELECT 1 AS recorded
FROM audit_log a
WHERE a.run_id = (SELECT s.run_id FROM steps s WHERE s.id = %(id)s)
  AND a.step_id = %(id)s
  AND a.lease_token = %(token)s
  AND a.worker_id = %(worker_id)s
  AND a.event = 'step_succeeded'
LIMIT 1

-- name: worker_stopped
UPDATE workers SET status = 'stopped', stopped_at = now(), last_heartbeat_at = now()
WHERE id = %(id)s

-- name: select_run
-- With, on a child run, its parent run and the name of the step that started it (0011).
SELECT r.id, r.seq, r.goal, r.status, r.idempotency_key, r.steps_total, r.steps_unfinished,
       r.steps_dead, r.priority, r.start_at, r.created_at, r.started_at, r.finished_at,
       r.updated_at, r.parent_run_id,
       (SELECT p.name FROM steps p WHERE r.parent_step_id IS NOT NULL AND p.id = r.parent_step_id)
           AS parent_step_name
FROM runs r WHERE r.id = %(run_id)s

-- name: select_run_steps_json
-- Every step of the run as the API's JSON array, built here: for a 10,000-step run this is
-- 3 to 5 times faster than decoding the rows and encoding them again in Python (measured).
-- The one definition of a step's JSON shape. Each unfinished step says what it is waiting
-- for (waitingFor), first reason that holds:
--   running        -> {"reason": "running", "worker", "leaseExpiresAt"}, or for a step of
--                     kind run, {"reason": "childRun", "runId"} (its child, running)
--   pending        -> "dependencies" (the unfinished ones, named), "mapChildren" (a map
--                     step's children left), "signal" (a wait step whose dependencies are
--                     done: the signal it waits for, its deadline, whether it is an
--                     approval), "delay" (a step with a delayMs, parked until
--                     when: its dependencies are done, or it is a root), or "startAt" (a
--                     delayed root without a delayMs, until when)
--   ready          -> "backoff" (until availableAt), "concurrencyKey" (the key is full),
--                     "childRun" (a step of kind run: runId null, the maintenance leader
--                     starts its child next), "noLiveWorker" (no live worker has the
--                     tool), else "queued"
-- Live worker: not stopped, heartbeat within %(lease_ttl_s)s.
-- The per-step lookups are LATERAL index probes, guarded so that only the steps that need
-- one make it: right after a run is inserted its tables have no statistics yet, and a
-- planner guessing at joins over the run's steps and edges took 120 s for a 10,000-step
-- layered run (measured: a seq scan of steps per pending step); probes on unique keys cost
-- the same with or without statistics.
WITH live_tools AS (
    SELECT coalesce(array_agg(DISTINCT t), '{}') AS tools
    FROM workers w CROSS JOIN LATERAL unnest(w.tools) AS t
    WHERE w.status <> 'stopped'
      AND w.last_heartbeat_at > now() - make_interval(secs => %(lease_ttl_s)s)
)
SELECT coalesce(json_agg(json_build_object(
           'name', s.name, 'tool', s.tool, 'input', s.input, 'dependsOn', s.depends_on,
           'runIf', s.run_if, 'status', s.status, 'attempt', s.attempt,
           'maxAttempts', s.max_attempts, 'timeoutMs', s.timeout_ms,
           'idempotent', s.idempotent, 'idempotencyKey', s.run_id || ':' || s.name,
           'priority', s.priority, 'concurrencyKey', s.concurrency_key,
           'maxConcurrency', s.max_concurrency, 'map', s.map, 'mapWidth', s.map_width,
           'mapIndex', s.map_index,
           'mapOf', m.name,
           'delayMs', CASE WHEN s.wait_signal IS NULL THEN s.delay_ms END,
           'wait', CASE WHEN s.wait_signal IS NOT NULL THEN json_build_object(
               'signal', s.wait_signal, 'timeoutS', s.delay_ms / 1000,
               'approval', coalesce(s.wait_approval, false)) END,
           'run', s.child_template, 'childRunId', s.child_run_id,
           'resolvedInput', s.resolved_input -> 'input',
           'availableAt', s.available_at, 'leaseOwner', s.lease_owner,
           'leaseExpiresAt', s.lease_expires_at, 'output', s.output, 'error', s.error,
           'waitingFor', CASE
               WHEN s.status IN ('succeeded', 'dead_letter', 'skipped', 'cancelled') THEN NULL
               WHEN s.status = 'running' AND s.child_run_id IS NOT NULL THEN json_build_object(
                   'reason', 'childRun', 'runId', s.child_run_id)
               WHEN s.status = 'running' THEN json_build_object(
                   'reason', 'running', 'worker', s.lease_owner,
                   'leaseExpiresAt', s.lease_expires_at)
               WHEN s.status = 'pending' AND s.map_width IS NOT NULL THEN json_build_object(
                   'reason', 'mapChildren', 'remaining', s.deps_remaining,
                   'width', s.map_width)
               WHEN s.status = 'pending' AND s.deps_remaining > 0 THEN json_build_object(
                   'reason', 'dependencies',
                   'steps', coalesce(wd.names, to_json(s.depends_on)))
               WHEN s.status = 'pending' AND s.wait_signal IS NOT NULL THEN json_build_object(
                   'reason', 'signal', 'signal', s.wait_signal, 'deadline', s.available_at,
                   'approval', coalesce(s.wait_approval, false))
               WHEN s.status = 'pending' AND s.delay_ms > 0 THEN json_build_object(
                   'reason', 'delay', 'until', s.available_at, 'delayMs', s.delay_ms)
               WHEN s.status = 'pending' THEN json_build_object(
                   'reason', 'startAt', 'until', s.available_at)
               WHEN s.available_at > now() THEN json_build_object(
                   'reason', 'backoff', 'until', s.available_at, 'attempt', s.attempt)
               WHEN cs.running >= cs.max_running THEN json_build_object(
                   'reason', 'concurrencyKey', 'key', cs.key, 'running', cs.running,
                   'maxConcurrency', cs.max_running)
               WHEN s.child_template IS NOT NULL THEN json_build_object(
                   'reason', 'childRun', 'runId', NULL)
               WHEN NOT s.tool = ANY(lt.tools) THEN json_build_object(
                   'reason', 'noLiveWorker', 'tool', s.tool)
               ELSE json_build_object('reason', 'queued') END,
           'createdAt', s.created_at, 'startedAt', s.started_at, 'finishedAt', s.finished_at,
           'updatedAt', s.updated_at) ORDER BY s.id), '[]')::text AS steps
FROM steps s
CROSS JOIN live_tools lt
LEFT JOIN LATERAL (
    -- one lookup per dependency on the unique (run_id, name) index: the planner can pick
    -- nothing else for it, statistics or not (a join here once seq-scanned steps per step)
    SELECT json_agg(d.name ORDER BY d.ord) AS names
    FROM unnest(s.depends_on) WITH ORDINALITY AS d(name, ord)
    -- (none ended yet: they are all still to come, as depends_on lists them)
    WHERE s.status = 'pending' AND s.deps_remaining > 0 AND s.map_width IS NULL
      AND s.deps_remaining < cardinality(s.depends_on)
      AND (SELECT p.status FROM steps p WHERE p.run_id = s.run_id AND p.name = d.name)
          IN ('pending', 'ready', 'running')
) wd ON true
LEFT JOIN LATERAL (
    SELECT c.key, c.running, c.max_running FROM concurrency_slots c
    WHERE s.concurrency_key IS NOT NULL AND c.key = s.concurrency_key
) cs ON true
LEFT JOIN LATERAL (
    SELECT m.name FROM steps m WHERE s.map_parent_id IS NOT NULL AND m.id = s.map_parent_id
) m ON true
WHERE s.run_id = %(run_id)s

-- name: select_run_status_counts
SELECT status, count(*)::integer AS n FROM steps WHERE run_id = %(run_id)s GROUP BY status

-- name: list_runs
-- Newest first, keyset-paginated on seq (cursor = the last seq seen).
SELECT id, seq, goal, status, idempotency_key, steps_total, steps_unfinished, steps_dead,
       priority, start_at, created_at, started_at, finished_at, updated_at
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
SELECT w.id, w.hostname, w.pid, w.concurrency, w.tools, w.kind, w.restarts, w.last_exit_code,
       w.status, w.started_at, w.last_heartbeat_at, w.stopped_at,
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

-- name: insert_api_token
-- A new scoped token (engine.tokens): only its sha256 is kept. A live token of the same name
-- violates api_tokens_live_name_idx (TokenNameTaken).
INSERT INTO api_tokens (name, scope, token_sha256)
VALUES (%(name)s, %(scope)s, %(token_sha256)s)
RETURNING id, created_at

-- name: list_api_tokens
-- Every token, live and revoked, oldest first; never the hash.
SELECT name, scope, created_at, last_used_at, revoked_at
FROM api_tokens
ORDER BY created_at, id

-- name: revoke_api_token
UPDATE api_tokens SET revoked_at = now()
WHERE name = %(name)s AND revoked_at IS NULL
RETURNING id

-- name: count_live_api_tokens
SELECT count(*)::integer AS n FROM api_tokens WHERE revoked_at IS NULL

-- name: select_live_api_token
SELECT id, name, scope FROM api_tokens
WHERE token_sha256 = %(token_sha256)s AND revoked_at IS NULL

-- name: touch_api_token
-- At most one write per %(interval_s)s per token, whichever API process asks.
UPDATE api_tokens SET last_used_at = now()
WHERE id = %(id)s
  AND (last_used_at IS NULL OR last_used_at < now() - make_interval(secs => %(interval_s)s))

-- name: ping
SELECT 1 AS ok

-- name: schema_revisions
SELECT version_num FROM alembic_version

-- name: metrics_queue
-- One scrape of the queue gauges (engine/metrics.py), one row per (kind, key): steps
-- ready / running / dead_letter by tool, each counted from its partial index
-- (steps_ready_idx leads with tool: an index-only scan; steps_lease_idx and
-- steps_dead_letter_idx then read the heap for the tool of each entry) -- never a scan of
-- steps; runs pending / running by status from runs_status_seq_idx; live workers and agents
-- by tool (heartbeat within %(lease_ttl_s)s). `oldest_s` is the age in seconds (database
-- clock) of the oldest ready step whose availableAt has come, per tool (NULL: none yet due).
-- The plans and their cost on 1,000,000 steps: docs/operations.md, "Metrics".
SELECT 'ready' AS kind, tool AS key, count(*)::bigint AS n,
       extract(epoch FROM now() - min(available_at) FILTER (WHERE available_at <= now()))
           ::float8 AS oldest_s
FROM steps WHERE status = 'ready' GROUP BY tool
UNION ALL
SELECT 'running', tool, count(*), NULL FROM steps WHERE status = 'running' GROUP BY tool
UNION ALL
SELECT 'dead_letter', tool, count(*), NULL FROM steps WHERE status = 'dead_letter' GROUP BY tool
UNION ALL
SELECT 'runs', status, count(*), NULL FROM runs
WHERE status IN ('pending', 'running') GROUP BY status
UNION ALL
SELECT 'workers', t, count(*), NULL
FROM workers w CROSS JOIN LATERAL unnest(w.tools) AS t
WHERE w.status <> 'stopped'
  AND w.last_heartbeat_at > now() - make_interval(secs => %(lease_ttl_s)s)
GROUP BY t

-- name: metrics_pg_tables
-- Postgres health of pgdag's big tables, from the statistics views (no table is read):
-- live and dead tuples, total size in bytes (heap + indexes + TOAST) and the last
-- autovacuum (epoch seconds, NULL: never). A partitioned table is summed over itself and
-- its partitions (pg_partition_tree, which is empty for a plain table; a partitioned parent
-- has no storage and no tuples of its own). A table that does not exist has no row.
SELECT t.name AS table_name,
       coalesce(sum(s.n_live_tup), 0)::float8 AS live_tuples,
       coalesce(sum(s.n_dead_tup), 0)::float8 AS dead_tuples,
       coalesce(sum(pg_total_relation_size(p.relid)), 0)::float8 AS size_bytes,
       extract(epoch FROM max(s.last_autovacuum))::float8 AS last_autovacuum_s
FROM unnest(%(tables)s::text[]) AS t(name)
CROSS JOIN LATERAL (
    SELECT to_regclass(t.name) AS relid
    UNION
    SELECT relid FROM pg_partition_tree(to_regclass(t.name))
) AS p
LEFT JOIN pg_stat_user_tables s ON s.relid = p.relid
WHERE p.relid IS NOT NULL
GROUP BY t.name

-- name: metrics_pg_activity
-- Connections of the whole cluster by state (client backends only; NULL state: one this
-- role may not see), and the age in seconds of the oldest open transaction of any other
-- client backend (what holds vacuum back; 0 when none). pg_stat_activity shows the state
-- and xact_start of other roles' sessions only to members of pg_read_all_stats.
SELECT coalesce(state, 'unknown') AS state, count(*)::float8 AS n,
       coalesce(max(extract(epoch FROM now() - xact_start))
                FILTER (WHERE pid <> pg_backend_pid()), 0)::float8 AS oldest_xact_s
FROM pg_stat_activity
WHERE backend_type = 'client backend'
GROUP BY coalesce(state, 'unknown')

-- name: select_signal
-- A signal already received by a run under the id %(signal_id)s (an idempotent repeat), with
-- the name of the step that consumed it, if any.
SELECT g.id, g.name, g.signal_id, g.payload, g.received_at, g.consumed_at, c.name AS consumed_by
FROM signals g LEFT JOIN steps c ON c.id = g.consumed_by
WHERE g.run_id = %(run_id)s AND g.signal_id = %(signal_id)s

-- name: select_wait_step
-- The wait step of run %(run_id)s that waits for signal %(signal)s (engine.dag lets one step
-- of a run wait for a signal), and its run's status; no row when the run is unknown; a row
-- with a NULL step when no step of the run waits for it.
SELECT r.status AS run_status, s.id, s.name, s.status
FROM runs r LEFT JOIN steps s ON s.run_id = r.id AND s.wait_signal = %(signal)s
WHERE r.id = %(run_id)s

-- name: insert_signal
-- Record a signal received by run %(run_id)s, once per (run, signal id): nothing (no row)
-- when the id is already taken (then select_signal gives the original). Audited
-- signal_received on the run (no step, no status change).
WITH ins AS (
    INSERT INTO signals (run_id, name, signal_id, payload)
    VALUES (%(run_id)s, %(signal)s, %(signal_id)s, %(payload)s::jsonb)
    ON CONFLICT (run_id, signal_id) DO NOTHING
    RETURNING id, run_id, name, signal_id, payload, received_at
), audit AS (
    INSERT INTO audit_log (run_id, event, detail)
    SELECT run_id, 'signal_received', jsonb_build_object('signal', name, 'signalId', signal_id)
    FROM ins
)
SELECT id, name, signal_id, payload, received_at FROM ins

-- name: take_wait_step
-- A signal reaches its wait step: pending (parked: its dependencies done, its run started)
-- -> running for an instant, with a fresh fencing token and a lease owned by %(owner)s
-- ("signal:<signal id>"), so that the same transaction ends the attempt through the worker
-- path, guarded by that token: complete_steps (the payload is its output; its dependents are
-- decided there as for any success) or fail_attempt (an approval rejected). Guarded on
-- status = 'pending' under the row's lock: time_out_wait_steps locks the same row (SKIP
-- LOCKED) and guards on the same status, so a signal racing the timeout either finds the
-- step still waiting or nothing (its attempt timed out first). The run starts if this is its
-- first attempt (a run whose only root is a wait step). Audited step_signalled (pending ->
-- running, detail: the signal and its id). Locks the step, then the run, like the timeout.
WITH target AS (
    SELECT s.id FROM steps s JOIN runs r ON r.id = s.run_id
    WHERE s.run_id = %(run_id)s AND s.wait_signal = %(signal)s
      AND s.status = 'pending' AND s.deps_remaining = 0
      AND (r.start_at IS NULL OR r.start_at <= now())
    FOR UPDATE OF s
), taken AS (
    UPDATE steps s
    SET status = 'running',
        attempt = s.attempt + 1,
        lease_token = nextval('lease_token_seq'),
        lease_owner = %(owner)s,
        lease_expires_at = now() + interval '1 minute',
        started_at = now(),
        updated_at = now()
    FROM target
    WHERE s.id = target.id AND s.status = 'pending'
    RETURNING s.id, s.run_id, s.name, s.attempt, s.max_attempts, s.lease_token,
              coalesce(s.wait_approval, false) AS approval, s.may_skip_children
), started_runs AS (
    UPDATE runs r
    SET status = 'running', started_at = now(), updated_at = now()
    WHERE r.id IN (SELECT run_id FROM taken) AND r.status = 'pending'
    RETURNING r.id
), audit AS (
    INSERT INTO audit_log (run_id, step_id, step_name, event, from_status, to_status,
                           attempt, lease_token, worker_id, detail)
    SELECT id, NULL::bigint, NULL::text, 'run_started', 'pending', 'running', NULL::integer,
           NULL::bigint, %(owner)s, NULL::jsonb
    FROM started_runs
    UNION ALL
    SELECT run_id, id, name, 'step_signalled', 'pending', 'running', attempt, lease_token,
           %(owner)s, jsonb_build_object('signal', %(signal)s::text,
                                         'signalId', %(signal_id)s::text)
    FROM taken
)
SELECT id, run_id, name, attempt, max_attempts, lease_token, approval, may_skip_children
FROM taken

-- name: consume_signal
-- Signal %(id)s was taken by step %(step_id)s (take_wait_step, same transaction).
UPDATE signals SET consumed_by = %(step_id)s, consumed_at = now()
WHERE id = %(id)s AND consumed_at IS NULL
RETURNING consumed_at

-- name: signals_to_deliver
-- Signals that came before their wait step was reached, whose step now waits (parked: its
-- dependencies done): the oldest unconsumed one per (run, signal), up to %(limit)s. The
-- maintenance leader's pass delivers them (take_wait_step), before it times out due wait
-- steps, so a step that parks finds its early signal within one PGDAG_REAPER_INTERVAL.
-- signals_unconsumed_idx; each probe of steps is on steps' (run_id, ...) index.
SELECT DISTINCT ON (g.run_id, g.name) g.id, g.run_id, g.name, g.signal_id, g.payload
FROM signals g
JOIN steps s ON s.run_id = g.run_id AND s.wait_signal = g.name
JOIN runs r ON r.id = g.run_id
WHERE g.consumed_at IS NULL AND s.status = 'pending' AND s.deps_remaining = 0
  AND (r.start_at IS NULL OR r.start_at <= now())
ORDER BY g.run_id, g.name, g.id
LIMIT %(limit)s

-- name: time_out_wait_steps
-- Wait steps whose deadline passed without their signal: the attempt fails (attempts + 1).
-- With attempts left it waits again (pending, a new deadline: now() + its timeout, audited
-- step_wait_timed_out pending -> pending); else pending -> dead_letter (audited
-- step_dead_lettered), and the caller skips its dependents by their trigger rules and
-- settles the run in the same transaction. Rows a signal holds are skipped (SKIP LOCKED:
-- the signal's take_wait_step wins them; the next pass finds them no longer pending).
-- Run by the maintenance leader's pass, before promote_due_steps (which leaves wait steps
-- alone). steps_scheduled_idx.
WITH due AS (
    SELECT id FROM steps
    WHERE status = 'pending' AND deps_remaining = 0 AND available_at <= now()
      AND wait_signal IS NOT NULL
    ORDER BY available_at
    LIMIT %(limit)s
    FOR UPDATE SKIP LOCKED
), upd AS (
    UPDATE steps s
    SET attempt = s.attempt + 1,
        status = CASE WHEN s.attempt + 1 < s.max_attempts THEN 'pending' ELSE 'dead_letter' END,
        available_at = CASE WHEN s.attempt + 1 < s.max_attempts
                            THEN now() + make_interval(secs => s.delay_ms / 1000.0)
                            ELSE now() END,
        error = 'no signal ' || s.wait_signal || ' within ' || (s.delay_ms / 1000) || ' s'
                || ' (attempt ' || (s.attempt + 1) || ' of ' || s.max_attempts || ')',
        finished_at = CASE WHEN s.attempt + 1 < s.max_attempts THEN NULL ELSE now() END,
        updated_at = now()
    FROM due
    WHERE s.id = due.id AND s.status = 'pending'
    RETURNING s.id, s.run_id, s.name, s.status, s.attempt, s.max_attempts, s.available_at,
              s.error, s.wait_signal
), audit AS (
    INSERT INTO audit_log (run_id, step_id, step_name, event, from_status, to_status,
                           attempt, detail)
    SELECT run_id, id, name,
           CASE WHEN status = 'pending' THEN 'step_wait_timed_out' ELSE 'step_dead_lettered' END,
           'pending', status, attempt,
           jsonb_build_object('reason', 'timeout', 'signal', wait_signal, 'error', error,
                              'maxAttempts', max_attempts)
           || CASE WHEN status = 'pending' THEN jsonb_build_object('until', available_at)
                   ELSE '{}'::jsonb END
    FROM upd
)
SELECT id, run_id, status FROM upd
