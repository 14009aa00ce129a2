"""Claim by tool: ``steps_ready_idx`` leads with ``tool``.

A worker claims only steps whose tool it has loaded (issue 10). The claim walks this index
once per tool of the worker, each walk in the claim's order (``priority DESC,
available_at, id``) within one tool, and keeps the best rows of all walks; see
``claim_steps`` in ``engine/sql/queries.sql``.

With the old key ``(priority DESC, available_at, id)`` the tool could only be a filter on
one walk of the whole ready index, which reads (heap and all) every ready step of other
tools that is ahead in that order before reaching one of its own: measured on 1,000,000
steps with 100,000 ready steps of a tool the worker lacks ahead of its own, 87 ms per claim
instead of 1 ms (docs/claim-plan.md). A mixed pool (a GPU box that is busy or down)
builds exactly that backlog. ``tool = ANY(...)`` as a trailing key column would not help
on PostgreSQL 15 and 16: a ScalarArrayOpExpr on a non-leading column makes the planner
treat the scan as unordered (or use it as a plain filter again).

The index replaces the old one (same name, same predicate, one entry per ready step as
before): nothing else reads it, and steps updates write no more index entries than before.
Built without CONCURRENTLY, like 0003's (alembic runs each migration in a transaction): it
blocks writes to steps while it reads the ready steps (a partial index: only those).
"""

from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


UPGRADE = r"""
DROP INDEX steps_ready_idx;
CREATE INDEX steps_ready_idx ON steps (tool, priority DESC, available_at, id)
    WHERE status = 'ready';
"""

DOWNGRADE = r"""
DROP INDEX steps_ready_idx;
CREATE INDEX steps_ready_idx ON steps (priority DESC, available_at, id) WHERE status = 'ready';
"""


def upgrade() -> None:
    op.execute(UPGRADE)


def downgrade() -> None:
    op.execute(DOWNGRADE)
