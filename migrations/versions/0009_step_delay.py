"""``steps.delay_ms``: a sleep that frees the worker (issue 15, part 2).

A step submitted with ``"delayMs": N`` waits N milliseconds after its dependencies are done
before it becomes ``ready``, and waits in Postgres, not in a worker: when its last dependency
is decided (``complete_steps``, ``fail_dependents``; a root when its run is inserted or
starts; a reset by replay), it stays ``pending`` with ``deps_remaining = 0`` and
``available_at = now() + delay_ms`` (audited ``step_delayed``), exactly like a run's delayed
roots (``startAt``). The maintenance leader's ``promote_due_steps`` makes it ``ready`` when
the time comes (audited ``step_ready`` with reason ``delay``), through
``steps_scheduled_idx`` (``available_at WHERE status = 'pending' AND deps_remaining = 0``,
migration 0003), which already covers the parked steps: no new index.

NULL means no delay (every step before this migration). The bound is engine.dag's
(``MAX_DELAY_MS``, 30 days); the CHECK only refuses a negative value. Adding a nullable
column without a default is a catalog change only (no rewrite of ``steps``).
"""

from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute("ALTER TABLE steps ADD COLUMN delay_ms integer CHECK (delay_ms >= 0)")


def downgrade() -> None:
    op.execute("ALTER TABLE steps DROP COLUMN delay_ms")
