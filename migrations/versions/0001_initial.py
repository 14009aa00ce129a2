"""Initial schema: runs, steps, step_edges, audit_log, workers.

Revision ID: 0001
Revises:
Create Date: 2026-11-21

Design notes (checked with EXPLAIN on 1,000,000 steps, see docs/guarantees.md):
- ``steps_ready_idx`` is a partial index holding only ready steps, ordered the way the claim
  query reads them, so claiming stays an index range scan however many finished steps the
  table holds.
- ``steps_lease_idx`` holds only running steps, by lease expiry, for the reaper.
- Every write to ``audit_log`` fires one statement-level trigger that NOTIFYs
  ``pgdag_events`` once per run touched (payload: run id and the newest event id, never data)
  and ``pgdag_ready`` when some step became ready (or a run was created with ready
  steps). The NOTIFY is therefore always in the same
  transaction as the audit row, and coalesced per statement.
"""

from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


UPGRADE = r"""
CREATE SEQUENCE lease_token_seq AS bigint;

CREATE TABLE runs (
    id               uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    seq              bigint GENERATED ALWAYS AS IDENTITY UNIQUE,
    goal             text NOT NULL DEFAULT '',
    status           text NOT NULL DEFAULT 'pending'
                     CHECK (status IN ('pending', 'running', 'completed', 'failed', 'cancelled')),
    idempotency_key  text UNIQUE,
    steps_total      integer NOT NULL CHECK (steps_total > 0),
    steps_unfinished integer NOT NULL CHECK (steps_unfinished >= 0),
    steps_dead       integer NOT NULL DEFAULT 0 CHECK (steps_dead >= 0),
    created_at       timestamptz NOT NULL DEFAULT now(),
    started_at       timestamptz,
    finished_at      timestamptz,
    updated_at       timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX runs_status_seq_idx ON runs (status, seq);

CREATE TABLE steps (
    id               bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    run_id           uuid NOT NULL REFERENCES runs (id) ON DELETE CASCADE,
    name             text NOT NULL,
    tool             text NOT NULL,
    input            jsonb NOT NULL,
    depends_on       text[] NOT NULL DEFAULT '{}',
    deps_remaining   integer NOT NULL CHECK (deps_remaining >= 0),
    status           text NOT NULL
                     CHECK (status IN ('pending', 'ready', 'running', 'succeeded',
                                       'dead_letter', 'skipped', 'cancelled')),
    attempt          integer NOT NULL DEFAULT 0,
    max_attempts     integer NOT NULL CHECK (max_attempts >= 1),
    timeout_ms       integer CHECK (timeout_ms > 0),
    idempotent       boolean NOT NULL DEFAULT true,
    available_at     timestamptz NOT NULL DEFAULT now(),
    lease_owner      text,
    lease_token      bigint,
    lease_expires_at timestamptz,
    output           jsonb,
    error            text,
    created_at       timestamptz NOT NULL DEFAULT now(),
    started_at       timestamptz,
    finished_at      timestamptz,
    updated_at       timestamptz NOT NULL DEFAULT now(),
    UNIQUE (run_id, name)
);
CREATE INDEX steps_ready_idx ON steps (available_at, id) WHERE status = 'ready';
CREATE INDEX steps_lease_idx ON steps (lease_expires_at) WHERE status = 'running';

CREATE TABLE step_edges (
    parent_id bigint NOT NULL REFERENCES steps (id) ON DELETE CASCADE,
    child_id  bigint NOT NULL REFERENCES steps (id) ON DELETE CASCADE,
    PRIMARY KEY (parent_id, child_id)
);
CREATE INDEX step_edges_child_idx ON step_edges (child_id);

CREATE TABLE audit_log (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    run_id      uuid NOT NULL REFERENCES runs (id) ON DELETE CASCADE,
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
CREATE INDEX audit_log_run_idx ON audit_log (run_id, id);

CREATE TABLE workers (
    id                text PRIMARY KEY,
    hostname          text NOT NULL,
    pid               integer NOT NULL,
    concurrency       integer NOT NULL,
    tools             text[] NOT NULL DEFAULT '{}',
    status            text NOT NULL DEFAULT 'running'
                      CHECK (status IN ('running', 'stopping', 'stopped')),
    started_at        timestamptz NOT NULL DEFAULT now(),
    last_heartbeat_at timestamptz NOT NULL DEFAULT now(),
    stopped_at        timestamptz
);

CREATE FUNCTION pgdag_notify_audit() RETURNS trigger LANGUAGE plpgsql AS $$
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

CREATE TRIGGER audit_log_notify
    AFTER INSERT ON audit_log
    REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION pgdag_notify_audit();
"""

DOWNGRADE = r"""
DROP TRIGGER IF EXISTS audit_log_notify ON audit_log;
DROP FUNCTION IF EXISTS pgdag_notify_audit();
DROP TABLE IF EXISTS workers;
DROP TABLE IF EXISTS audit_log;
DROP TABLE IF EXISTS step_edges;
DROP TABLE IF EXISTS steps;
DROP TABLE IF EXISTS runs;
DROP SEQUENCE IF EXISTS lease_token_seq;
"""


def upgrade() -> None:
    op.execute(UPGRADE)


def downgrade() -> None:
    op.execute(DOWNGRADE)
