"""``runs.idempotency_fingerprint``: what a client idempotency key was first used for.

The sha256 (hex) of the run's canonical JSON as `engine.dag.RunSpec.fingerprint` builds it
(the parsed body, defaults filled in, ``startAt`` in UTC, keys sorted, no whitespace, the
key itself left out). A later ``POST /runs`` with the same ``idempotencyKey`` gets the run
only when its fingerprint is the same; another payload is refused with 422, as the IETF
draft *The Idempotency-Key HTTP Header Field* (draft-ietf-httpapi-idempotency-key-header,
section 2.7) suggests for a key reused with a different request payload.

Runs submitted before this migration have NULL here: the key still returns them, whatever
the payload (the behaviour they were created under). Runs without a key have NULL too.

It also repairs the times the API stored before it bounded them (`engine.dag.ApiDatetime`):
a ``startAt`` that lay in year 0 or 10000 in UTC was kept, and psycopg cannot load such a
value into a Python datetime, so every read of the run failed, and a run that never starts
is never pruned. A ``runs.start_at`` before 0001-01-02 UTC becomes 1970-01-01 (it was in the
past: the run already started), one after 9999-12-30 23:59:59.999999 UTC becomes that bound,
and so does its delayed roots' ``steps.available_at`` (still far in the future: nothing
changes for them). Values inside years 1..9999 are left as they are. One scan of each table.
The downgrade keeps the repaired values.
"""

from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


LATEST = "'9999-12-30 23:59:59.999999+00'::timestamptz"

REPAIR_TIMES = f"""
UPDATE runs SET start_at = '1970-01-01 00:00:00+00'
WHERE start_at < '0001-01-02 00:00:00+00'::timestamptz;
UPDATE runs SET start_at = {LATEST} WHERE start_at > {LATEST};
UPDATE steps SET available_at = {LATEST} WHERE available_at > {LATEST};
"""


def upgrade() -> None:
    op.execute(
        "ALTER TABLE runs ADD COLUMN idempotency_fingerprint text"
        " CHECK (idempotency_fingerprint ~ '^[0-9a-f]{64}$')"
    )
    op.execute(REPAIR_TIMES)


def downgrade() -> None:
    op.execute("ALTER TABLE runs DROP COLUMN idempotency_fingerprint")
