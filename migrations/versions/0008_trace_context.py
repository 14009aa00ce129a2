"""``runs.trace_context``: the W3C trace context of the run's span (engine/tracing.py).

``POST /runs`` starts a span per run (a child of the client's ``traceparent``, if it sent
one) and stores its context here, as the propagation carrier: a JSON object
``{"traceparent": "00-<trace id>-<span id>-<flags>"}`` (plus ``"tracestate"`` when there
is one). Each attempt's span, in whichever worker or agent claims the step, is a child of
it: the claim statement returns it with the step. NULL when the API had no trace context to
store (tracing off: no ``pgdag[otel]``, or no tracer provider and no incoming
``traceparent``), and for runs made before this migration.

There is no other place for it: the context must outlive the request that made it (an
attempt starts minutes or days later, in another process), ``audit_log`` is pruned by
partition and is not read by the claim, and nothing else of a run is free-form. Adding a
nullable column without a default is a catalog change only (no rewrite of ``runs``).
"""

from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute(
        "ALTER TABLE runs ADD COLUMN trace_context jsonb"
        " CHECK (jsonb_typeof(trace_context) = 'object')"
    )


def downgrade() -> None:
    op.execute("ALTER TABLE runs DROP COLUMN trace_context")
