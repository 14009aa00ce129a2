-- Schedules (migration 0012, engine.schedules): every query on schedules and schedule_fires.
-- Loaded with queries.sql by engine/sql/__init__.py. Writes are called only from
-- engine/transitions.py; each is guarded (the schedule's expected state) and a guarded write
-- that matches nothing is an error there, never a silent no-op. Times: now() of the database.

-- name: schedule_now
-- The database clock, read in the transaction that computes a new schedule's first fire.
SELECT now() AS now

-- name: insert_schedule
-- A new schedule, or nothing when its name is taken (then: select_schedule).
INSERT INTO schedules (name, cron, timezone, template, missed_policy, catch_up_limit,
                       next_fire_at)
VALUES (%(name)s, %(cron)s, %(timezone)s, %(template)s::jsonb, %(policy)s, %(catch_up)s,
        %(next_fire_at)s)
ON CONFLICT (name) DO NOTHING
RETURNING id

-- name: select_schedule
-- One schedule by id (%(id)s, NULL when the caller has a name) or by name, with the
-- database's now() (a resume computes the next fire from it). FOR UPDATE variant below.
SELECT s.*, now() AS now FROM schedules s
WHERE (%(id)s::uuid IS NOT NULL AND s.id = %(id)s::uuid)
   OR (%(id)s::uuid IS NULL AND s.name = %(name)s)

-- name: lock_schedule
-- select_schedule, holding the row until the transaction ends (pause, resume, delete: a fire
-- of the same schedule waits, or is waited for).
SELECT s.*, now() AS now FROM schedules s
WHERE (%(id)s::uuid IS NOT NULL AND s.id = %(id)s::uuid)
   OR (%(id)s::uuid IS NULL AND s.name = %(name)s)
FOR UPDATE

-- name: list_schedules
-- Every schedule by name, with its latest fire (time, run, and that run's status; the run
-- may have been pruned: NULL status) and how many fires it made.
SELECT s.*, f.fire_at AS last_fire_at, f.run_id AS last_run_id, f.error AS last_error,
       r.status AS last_run_status,
       (SELECT count(*) FROM schedule_fires c WHERE c.schedule_id = s.id) AS fires
FROM schedules s
LEFT JOIN LATERAL (
    SELECT fire_at, run_id, error FROM schedule_fires
    WHERE schedule_id = s.id ORDER BY fire_at DESC LIMIT 1
) f ON true
LEFT JOIN runs r ON r.id = f.run_id
ORDER BY s.name
LIMIT %(limit)s

-- name: list_schedule_fires
-- A schedule's latest %(limit)s fires, newest first, with each run's status (NULL: pruned,
-- or no run: see error).
SELECT f.fire_at, f.run_id, f.missed, f.error, f.fired_at, r.status AS run_status
FROM schedule_fires f
LEFT JOIN runs r ON r.id = f.run_id
WHERE f.schedule_id = %(id)s
ORDER BY f.fire_at DESC
LIMIT %(limit)s

-- name: count_schedule_fires
SELECT count(*) AS n FROM schedule_fires WHERE schedule_id = %(id)s

-- name: lock_due_schedule
-- The maintenance leader's pick: one schedule not paused whose next fire time has come on
-- the database clock (and not among %(skip)s: the ones that failed earlier in this pass), oldest
-- due first, locked (a schedule another leader's pass holds, or a
-- pause in progress, is skipped: SKIP LOCKED). schedules_due_idx.
SELECT s.*, now() AS now FROM schedules s
WHERE NOT s.paused AND s.next_fire_at <= now() AND s.id <> ALL (%(skip)s::uuid[])
ORDER BY s.next_fire_at
LIMIT 1
FOR UPDATE SKIP LOCKED

-- name: record_schedule_fire
-- One fire: unique per (schedule, fire time). A second insert of the same fire (only when
-- next_fire_at was set back by hand: the row lock and next_fire_at advance together) inserts
-- nothing, and the run of that fire's idempotency key is the first one. A run created by
-- this fire (%(created)s) gets a schedule_fired row in its audit log (run level, no status
-- change: its provenance), after its run_created.
WITH fire AS (
    INSERT INTO schedule_fires (schedule_id, fire_at, run_id, missed, error)
    VALUES (%(id)s, %(fire_at)s, %(run_id)s, %(missed)s, %(error)s)
    ON CONFLICT (schedule_id, fire_at) DO NOTHING
    RETURNING schedule_id, fire_at, run_id, missed
), audit AS (
    INSERT INTO audit_log (run_id, event, detail)
    SELECT f.run_id, 'schedule_fired',
           jsonb_build_object('scheduleId', f.schedule_id, 'schedule', %(name)s::text,
                              'fireAt', f.fire_at, 'missed', f.missed)
    FROM fire f
    WHERE f.run_id IS NOT NULL AND %(created)s
)
SELECT fire_at FROM fire

-- name: advance_schedule
-- After a pass: the first fire time not fired yet. Guarded by the next_fire_at the pass read
-- (under its row lock) and by the schedule not being paused.
UPDATE schedules SET next_fire_at = %(next_fire_at)s, updated_at = now()
WHERE id = %(id)s AND next_fire_at = %(expected)s AND NOT paused
RETURNING id

-- name: pause_schedule
-- Not paused -> paused: the leader fires it no more.
UPDATE schedules SET paused = true, updated_at = now()
WHERE id = %(id)s AND NOT paused
RETURNING id

-- name: resume_schedule
-- Paused -> not paused, its next fire the first fire time after now (computed by the caller
-- from the database's now()): the times that passed while it was paused are not fired.
UPDATE schedules SET paused = false, next_fire_at = %(next_fire_at)s, updated_at = now()
WHERE id = %(id)s AND paused
RETURNING id

-- name: delete_schedule
-- A schedule and its fires (ON DELETE CASCADE); the runs it submitted stay.
DELETE FROM schedules WHERE id = %(id)s RETURNING id
