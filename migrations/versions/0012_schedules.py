"""Schedules fired by the maintenance leader (issue 15, part 3).

``schedules``: one row per schedule (``POST /schedules``): its cron expression, IANA time
zone, run template (the ``POST /runs`` body each fire submits), missed-fire policy
(``skip``, or ``catch_up`` with its limit), whether it is paused, and ``next_fire_at``: the
first fire time not yet fired (UTC; computed in the schedule's zone by engine.schedules).
``schedules_due_idx`` is the leader's walk of the due ones.

``schedule_fires``: one row per fire, unique per (schedule, fire time): the run it submitted
(NULL when the template could no longer be submitted: ``error`` says why) and how many
older fire times the policy left unfired just before it (``missed``). The leader writes the
fire, the run (idempotency key ``schedule:<id>:<fire time>``) and the new ``next_fire_at``
in one transaction, holding the schedule's row lock: a leader killed in the middle leaves
none of it, and no two leaders fire the same time. ``run_id`` has no foreign key (like
``step_edges``): the pruner deletes old runs without touching this table, and a read shows a
pruned run as gone. A schedule's fires go with it (ON DELETE CASCADE); its runs stay.
"""

from alembic import op

revision = "0012"
down_revision = "0011"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute(
        """
CREATE TABLE schedules (
    id              uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    name            text NOT NULL UNIQUE,
    cron            text NOT NULL,
    timezone        text NOT NULL,
    template        jsonb NOT NULL,
    missed_policy   text NOT NULL CHECK (missed_policy IN ('skip', 'catch_up')),
    catch_up_limit  integer NOT NULL CHECK (catch_up_limit >= 1),
    paused          boolean NOT NULL DEFAULT false,
    next_fire_at    timestamptz NOT NULL,
    created_at      timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now(),
    CHECK (missed_policy = 'catch_up' OR catch_up_limit = 1)
);
CREATE INDEX schedules_due_idx ON schedules (next_fire_at) WHERE NOT paused;

CREATE TABLE schedule_fires (
    schedule_id uuid NOT NULL REFERENCES schedules (id) ON DELETE CASCADE,
    fire_at     timestamptz NOT NULL,
    run_id      uuid,
    missed      integer NOT NULL DEFAULT 0 CHECK (missed >= 0),
    error       text,
    fired_at    timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (schedule_id, fire_at),
    CHECK ((run_id IS NULL) <> (error IS NULL))
);
"""
    )


def downgrade() -> None:
    op.execute("DROP TABLE schedule_fires; DROP TABLE schedules")
