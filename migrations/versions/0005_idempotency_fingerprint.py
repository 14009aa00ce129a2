"""``runs.idempotency_fingerprint``: what a client idempotency key was first used for.

The sha256 (hex) of the run's canonical JSON as `engine.dag.RunSpec.fingerprint` builds it
(the parsed body, defaults filled in, ``startAt`` in UTC, keys sorted, no whitespace, the
key itself left out). A later ``POST /runs`` with the same ``idempotencyKey`` gets the run
only when its fingerprint is the same; another payload is refused with 422, as the IETF
draft *The Idempotency-Key HTTP Header Field* (draft-ietf-httpapi-idempotency-key-header,
section 2.7) suggests for a key reused with a different request payload.

Runs submitted before this migration have NULL here: the key still returns them, whatever
the payload (the behaviour they were created under). Runs without a key have NULL too.
"""

from alembic import op

revision = "0005"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute(
        "ALTER TABLE runs ADD COLUMN idempotency_fingerprint text"
        " CHECK (idempotency_fingerprint ~ '^[0-9a-f]{64}$')"
    )


def downgrade() -> None:
    op.execute("ALTER TABLE runs DROP COLUMN idempotency_fingerprint")
