"""Signals and wait steps (issue 15, part 1).

A step of kind ``wait`` (``{"name", "wait": {"signal", "timeoutS", "approval"}}``) is never
claimed by a worker: its ``tool`` is the reserved ``$wait`` (engine.tools refuses to
register a ``$`` name, the agent API refuses to claim one), and it never becomes
``ready``. It parks like a ``delayMs`` step (migration 0009): ``delay_ms`` holds its timeout,
so every statement that parks a step (insert_steps, complete_steps, fail_dependents,
reset_steps) parks it with ``available_at`` = its deadline, unchanged. ``wait_signal`` names
the signal it waits for; ``wait_approval`` marks an approval (the dashboard's Approve /
Reject). The maintenance leader's promote pass fails a due wait step instead of making it
ready (``time_out_wait_steps``), and delivers signals that came before their step parked
(``signals_to_deliver``).

``signals`` keeps every signal received: unique on ``(run_id, signal_id)`` so that a signal
sent twice with one id (``Idempotency-Key``) is recorded once; ``consumed_by`` /
``consumed_at`` say which step took it. ``signals_unconsumed_idx`` finds the waiting ones.
Rows go with their run (ON DELETE CASCADE).
"""

from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute(
        """
        ALTER TABLE steps ADD COLUMN wait_signal text, ADD COLUMN wait_approval boolean;
        CREATE TABLE signals (
            id           bigserial PRIMARY KEY,
            run_id       uuid NOT NULL REFERENCES runs (id) ON DELETE CASCADE,
            name         text NOT NULL,
            signal_id    text NOT NULL,
            payload      jsonb NOT NULL,
            received_at  timestamptz NOT NULL DEFAULT now(),
            consumed_by  bigint,
            consumed_at  timestamptz,
            UNIQUE (run_id, signal_id)
        );
        CREATE INDEX signals_unconsumed_idx ON signals (run_id, name, id)
            WHERE consumed_at IS NULL;
        """
    )


def downgrade() -> None:
    op.execute(
        """
        DROP TABLE signals;
        ALTER TABLE steps DROP COLUMN wait_signal, DROP COLUMN wait_approval;
        """
    )
