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
The walks run in ``pgdag_pick_ready`` (plpgsql): its statement's plan is cached, where the
claim statement itself is planned on every call, and the same walks written inline as a
LATERAL join over the tools cost 0.5 ms more per claim with a worker's five tools (1.16 vs
0.56 ms a claim round trip before this change, measured alternately; the function: 0.69 to
0.76 ms).

``pgdag_pick_ready`` must be VOLATILE (it locks rows), and each statement in a VOLATILE
function takes a snapshot of its own: the walks see steps made ready after the claim
statement's own snapshot was taken, with the outputs that made them ready. So
``pgdag_ref_context``, which reads those outputs for the claimed steps' references, is made
VOLATILE here too: STABLE, it read the claim statement's older snapshot, in which the step
referred to could still be ``running`` ("step a is running, so it has no output"; seen in
CI as a flaky tests/integration/test_data_flow.py on PostgreSQL 18). A later snapshot sees
all an earlier one saw, so it sees every output the walk's rows depend on.

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

-- Reads outputs with a snapshot no older than pgdag_pick_ready's (see the docstring).
ALTER FUNCTION pgdag_ref_context(uuid, text[]) VOLATILE;

-- Up to p_limit ready steps of each tool in p_tools, each tool's in claim order (one walk
-- of steps_ready_idx per tool), locked FOR UPDATE SKIP LOCKED; keys already full are not
-- picked. claim_steps keeps the best p_limit of them.
CREATE FUNCTION pgdag_pick_ready(p_tools text[], p_limit integer)
RETURNS TABLE (id bigint, concurrency_key text, priority integer, available_at timestamptz)
LANGUAGE plpgsql ROWS 32 AS $$
DECLARE
    v_tool text;
BEGIN
    FOREACH v_tool IN ARRAY p_tools LOOP
        RETURN QUERY
            SELECT s.id, s.concurrency_key, s.priority, s.available_at
            FROM steps s
            WHERE s.status = 'ready' AND s.tool = v_tool AND s.available_at <= now()
              AND (s.concurrency_key IS NULL
                   OR s.concurrency_key NOT IN (SELECT c.key FROM concurrency_slots c
                                                WHERE c.running >= c.max_running))
            ORDER BY s.priority DESC, s.available_at, s.id
            LIMIT p_limit
            FOR UPDATE OF s SKIP LOCKED;
    END LOOP;
END
$$;
"""

DOWNGRADE = r"""
ALTER FUNCTION pgdag_ref_context(uuid, text[]) STABLE;
DROP FUNCTION pgdag_pick_ready(text[], integer);
DROP INDEX steps_ready_idx;
CREATE INDEX steps_ready_idx ON steps (priority DESC, available_at, id) WHERE status = 'ready';
"""


def upgrade() -> None:
    op.execute(UPGRADE)


def downgrade() -> None:
    op.execute(DOWNGRADE)
