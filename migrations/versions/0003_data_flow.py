"""Data flow and DAG power: references between steps, trigger rules, map fan-out, priorities,
delayed runs and concurrency keys.

Steps:
- ``run_if`` (``all_succeeded`` | ``all_done`` | ``any_failed``) and ``deps_failed``, the
  number of dependencies that ended without succeeding, counted beside ``deps_remaining``
  by the statement that ends each dependency.
- ``refs``: the ``{"$ref": ...}`` places of the input, parsed at submit time by
  `engine.dag` as ``[{"at": [...], "path": [...], "ref": "...", "field": "..."}]``;
  ``ref_steps`` the steps they name. ``resolved_input`` is what the claim resolved them to
  (``{"input": ...}`` or ``{"error": ...}``).
- ``map`` / ``map_path``: a map step's source; ``map_width`` its child count once expanded;
  ``map_parent_id`` / ``map_index`` / ``map_item`` on each child.
- ``priority`` (copied from the run), ``concurrency_key`` / ``max_concurrency``.
- ``may_skip_children``: a dependent has ``"runIf": "any_failed"``, so this step's success
  may skip it (and the completion must then run in a transaction that settles the skip).

``steps_ready_idx`` becomes ``(priority DESC, available_at, id)``: the claim's order.
Delayed roots (``startAt``) wait as ``pending`` with no dependencies left; the claim
statement promotes them when their time comes (``steps_scheduled_idx``), so that a million
runs scheduled for tomorrow are not in the ready index the claim walks.

``concurrency_slots`` holds one row per concurrency key: the limit and the number of steps
of the key now running. The claim statement takes slots with ``pgdag_take_slots`` under the
row's lock (an UPDATE, re-checked on the newest row version, so two claimers cannot both take
the last slot; a function, because the claim is planned afresh on every call and these
statements inline cost it 0.4 ms of planning each time, while a function's plans are
cached); a row trigger gives a slot back whenever a step of the key leaves ``running``, by
whatever transition, so the count cannot drift from the steps table.

``pgdag_resolve_input`` resolves a step's references against the outputs of the steps they
name (``pgdag_ref_context``) and a map child's element; a path that is missing gives
``{"error": ...}``, never an exception, so one bad reference cannot fail a claim batch.
"""

from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


UPGRADE = r"""
ALTER TABLE runs
    ADD COLUMN priority integer NOT NULL DEFAULT 0,
    ADD COLUMN start_at timestamptz;

ALTER TABLE steps
    ADD COLUMN run_if text NOT NULL DEFAULT 'all_succeeded'
        CHECK (run_if IN ('all_succeeded', 'all_done', 'any_failed')),
    ADD COLUMN deps_failed integer NOT NULL DEFAULT 0 CHECK (deps_failed >= 0),
    ADD COLUMN priority integer NOT NULL DEFAULT 0,
    ADD COLUMN concurrency_key text,
    ADD COLUMN max_concurrency integer CHECK (max_concurrency >= 1),
    ADD COLUMN refs jsonb,
    ADD COLUMN ref_steps text[],
    ADD COLUMN resolved_input jsonb,
    ADD COLUMN map text,
    ADD COLUMN map_path jsonb,
    ADD COLUMN map_width integer CHECK (map_width >= 0),
    ADD COLUMN map_parent_id bigint,
    ADD COLUMN map_index integer,
    ADD COLUMN map_item jsonb,
    ADD COLUMN may_skip_children boolean NOT NULL DEFAULT false;

DROP INDEX steps_ready_idx;
CREATE INDEX steps_ready_idx ON steps (priority DESC, available_at, id) WHERE status = 'ready';
CREATE INDEX steps_scheduled_idx ON steps (available_at)
    WHERE status = 'pending' AND deps_remaining = 0;
CREATE INDEX steps_map_children_idx ON steps (map_parent_id, map_index)
    WHERE map_parent_id IS NOT NULL;
CREATE INDEX steps_dead_letter_idx ON steps (finished_at) WHERE status = 'dead_letter';

CREATE TABLE concurrency_slots (
    key         text PRIMARY KEY,
    max_running integer NOT NULL CHECK (max_running >= 1),
    running     integer NOT NULL DEFAULT 0 CHECK (running >= 0),
    granted     integer NOT NULL DEFAULT 0
) WITH (fillfactor = 50);

CREATE FUNCTION pgdag_release_slot() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    UPDATE concurrency_slots SET running = running - 1 WHERE key = OLD.concurrency_key;
    RETURN NULL;
END
$$;

CREATE TRIGGER steps_release_slot
    AFTER UPDATE OF status ON steps
    FOR EACH ROW
    WHEN (OLD.concurrency_key IS NOT NULL AND OLD.status = 'running'
          AND NEW.status <> 'running')
    EXECUTE FUNCTION pgdag_release_slot();

CREATE TRIGGER steps_release_slot_on_delete
    AFTER DELETE ON steps
    FOR EACH ROW
    WHEN (OLD.concurrency_key IS NOT NULL AND OLD.status = 'running')
    EXECUTE FUNCTION pgdag_release_slot();

-- ROWS 1: the planner's default guess for a set-returning function (1,000 rows) turned the
-- claim's UPDATE into a hash join over a seq scan of steps (measured 27 ms per claim).
CREATE FUNCTION pgdag_take_slots(ids bigint[], keys text[]) RETURNS SETOF bigint
LANGUAGE plpgsql ROWS 1 AS $$
DECLARE
    k         text;
    n_granted integer;
BEGIN
    -- Slot rows are locked in key order, so claimers cannot deadlock on them. The UPDATE is
    -- re-checked on the row's newest version once the lock is ours (READ COMMITTED), so two
    -- claimers cannot both take the last slot.
    FOR k IN SELECT DISTINCT x FROM unnest(keys) AS x ORDER BY x LOOP
        UPDATE concurrency_slots
        SET granted = least((SELECT count(*) FROM unnest(keys) AS y WHERE y = k),
                            greatest(max_running - running, 0)),
            running = running + least((SELECT count(*) FROM unnest(keys) AS y WHERE y = k),
                                      greatest(max_running - running, 0))
        WHERE key = k
        RETURNING concurrency_slots.granted INTO n_granted;
        -- the first `granted` of this key's steps, in the order given (the claim's order)
        RETURN QUERY
            SELECT t.id FROM unnest(ids, keys) WITH ORDINALITY AS t(id, key, ord)
            WHERE t.key = k ORDER BY t.ord LIMIT coalesce(n_granted, 0);
    END LOOP;
END
$$;

CREATE FUNCTION pgdag_ref_context(run uuid, names text[]) RETURNS jsonb
LANGUAGE plpgsql STABLE AS $$
BEGIN
    -- {"steps": {name: {"status", "error"[, "output"]}}}: what references may read. Only a
    -- succeeded step has an output to read.
    RETURN jsonb_build_object('steps', (
        SELECT coalesce(jsonb_object_agg(p.name,
                   jsonb_build_object('status', p.status, 'error', p.error)
                   || CASE WHEN p.status = 'succeeded'
                           THEN jsonb_build_object('output', p.output)
                           ELSE '{}'::jsonb END), '{}'::jsonb)
        FROM steps p WHERE p.run_id = run AND p.name = ANY(names)));
END
$$;

CREATE FUNCTION pgdag_resolve_input(input jsonb, refs jsonb, ctx jsonb) RETURNS jsonb
LANGUAGE plpgsql IMMUTABLE AS $$
DECLARE
    r      jsonb;
    cur    jsonb;
    parent jsonb;
    seg    text;
    walked text;
    result jsonb := input;
BEGIN
    FOR r IN SELECT value FROM jsonb_array_elements(refs) LOOP
        cur := ctx;
        walked := '';
        FOR seg IN SELECT value FROM jsonb_array_elements_text(r -> 'path') LOOP
            parent := cur;
            IF jsonb_typeof(cur) = 'object' THEN
                cur := cur -> seg;
            ELSIF jsonb_typeof(cur) = 'array' AND seg ~ '^-?[0-9]{1,9}$' THEN
                cur := cur -> seg::integer;
            ELSE
                cur := NULL;
            END IF;
            IF cur IS NULL THEN
                IF seg = 'output' AND parent ? 'status' THEN
                    RETURN jsonb_build_object('error', format(
                        '%s: $ref %s cannot be resolved: step %s is %s, so it has no output',
                        r ->> 'field', r ->> 'ref', r -> 'path' ->> 1, parent ->> 'status'));
                END IF;
                RETURN jsonb_build_object('error', format(
                    '%s: $ref %s cannot be resolved: %s %s',
                    r ->> 'field', r ->> 'ref',
                    CASE WHEN walked = '' THEN 'there is no' ELSE walked || ' has no' END,
                    CASE WHEN jsonb_typeof(parent) = 'array'
                         THEN 'element ' || seg || ' (an array of '
                              || jsonb_array_length(parent) || ')'
                         WHEN jsonb_typeof(parent) = 'object' THEN 'key "' || seg || '"'
                         ELSE '"' || seg || '" (it is ' || jsonb_typeof(parent) || ')' END));
            END IF;
            walked := CASE WHEN walked = '' THEN seg ELSE walked || '.' || seg END;
        END LOOP;
        IF jsonb_array_length(r -> 'at') = 0 THEN
            result := cur;
        ELSE
            result := jsonb_set(result, ARRAY(SELECT jsonb_array_elements_text(r -> 'at')), cur);
        END IF;
    END LOOP;
    RETURN jsonb_build_object('input', result);
END
$$;

CREATE OR REPLACE FUNCTION pgdag_notify_audit() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('pgdag_events',
                      json_build_object('runId', run_id, 'eventId', max(id))::text)
    FROM new_rows GROUP BY run_id;
    IF EXISTS (SELECT 1 FROM new_rows
               WHERE to_status = 'ready' OR event IN ('run_created', 'step_map_expanded')) THEN
        PERFORM pg_notify('pgdag_ready', '');
    END IF;
    RETURN NULL;
END
$$;
"""

DOWNGRADE = r"""
CREATE OR REPLACE FUNCTION pgdag_notify_audit() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('pgdag_events',
                      json_build_object('runId', run_id, 'eventId', max(id))::text)
    FROM new_rows GROUP BY run_id;
    IF EXISTS (SELECT 1 FROM new_rows WHERE to_status = 'ready' OR event = 'run_created') THEN
        PERFORM pg_notify('pgdag_ready', '');
    END IF;
    RETURN NULL;
END
$$;
DROP FUNCTION pgdag_resolve_input(jsonb, jsonb, jsonb);
DROP FUNCTION pgdag_take_slots(bigint[], text[]);
DROP FUNCTION pgdag_ref_context(uuid, text[]);
DROP TRIGGER steps_release_slot_on_delete ON steps;
DROP TRIGGER steps_release_slot ON steps;
DROP FUNCTION pgdag_release_slot();
DROP TABLE concurrency_slots;
DROP INDEX steps_dead_letter_idx;
DROP INDEX steps_map_children_idx;
DROP INDEX steps_scheduled_idx;
DROP INDEX steps_ready_idx;
DELETE FROM step_edges e USING steps s WHERE s.map_parent_id IS NOT NULL
    AND (e.child_id = s.id OR e.parent_id = s.id);
DELETE FROM steps WHERE map_parent_id IS NOT NULL;
CREATE INDEX steps_ready_idx ON steps (available_at, id) WHERE status = 'ready';
ALTER TABLE steps
    DROP COLUMN run_if, DROP COLUMN deps_failed, DROP COLUMN priority,
    DROP COLUMN concurrency_key, DROP COLUMN max_concurrency, DROP COLUMN refs,
    DROP COLUMN ref_steps, DROP COLUMN resolved_input, DROP COLUMN map, DROP COLUMN map_path,
    DROP COLUMN map_width, DROP COLUMN map_parent_id, DROP COLUMN map_index,
    DROP COLUMN map_item, DROP COLUMN may_skip_children;
ALTER TABLE runs DROP COLUMN priority, DROP COLUMN start_at;
"""


def upgrade() -> None:
    op.execute(UPGRADE)


def downgrade() -> None:
    op.execute(DOWNGRADE)
