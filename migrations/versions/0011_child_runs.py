"""Child runs: steps of kind ``run`` (issue 15, part 4).

A step submitted with ``"run": {template}`` instead of a tool starts a child run from the
template and ends with its outcome. Columns:

- ``steps.child_template``: the step's child-run template (the ``run`` object as submitted,
  with its ``{"$param": ...}`` placeholders); NULL for every other step. Such a step's
  ``tool`` is the reserved ``$run`` (engine.dag.CHILD_RUN_TOOL), which no worker or agent can
  load, so only the maintenance leader ever takes it.
- ``steps.child_run_id``: the child run of the step's current attempt (NULL before the first).
- ``runs.parent_run_id`` / ``runs.parent_step_id``: on a child run, the run and the step that
  started it (ON DELETE SET NULL: the pruner may delete a finished parent first).

Indexes, for the lookups the engine runs:

- ``steps_child_wait_idx``: the run steps whose child is running (``finish_child_runs``
  probes their child runs' status each maintenance pass), partial so it holds only those;
- ``runs_parent_idx``: a run's unfinished children (``cancel_child_runs``), partial on
  ``parent_run_id IS NOT NULL``.

The child's own idempotency key (``pgdag-child:<parentRunId>:<stepName>:<attempt>``) is in
the existing unique ``runs.idempotency_key``: one child per attempt, whatever crashes.
"""

from alembic import op

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute(
        """
        ALTER TABLE steps ADD COLUMN child_template jsonb,
                          ADD COLUMN child_run_id uuid;
        ALTER TABLE runs ADD COLUMN parent_run_id uuid REFERENCES runs (id) ON DELETE SET NULL,
                         ADD COLUMN parent_step_id bigint;
        CREATE INDEX steps_child_wait_idx ON steps (child_run_id)
            WHERE child_run_id IS NOT NULL AND status = 'running';
        CREATE INDEX runs_parent_idx ON runs (parent_run_id) WHERE parent_run_id IS NOT NULL;
        """
    )


def downgrade() -> None:
    op.execute(
        """
        DROP INDEX IF EXISTS runs_parent_idx;
        DROP INDEX IF EXISTS steps_child_wait_idx;
        ALTER TABLE runs DROP COLUMN parent_step_id, DROP COLUMN parent_run_id;
        ALTER TABLE steps DROP COLUMN child_run_id, DROP COLUMN child_template;
        """
    )
