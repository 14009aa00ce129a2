"""Schedules fired by the maintenance leader (issue 15, part 3).

Reserved in the chain so that the parts of issue 15 can be built side by side; the part that
owns this revision fills it in.
"""

from alembic import op

revision = "0012"
down_revision = "0011"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute("SELECT 1")


def downgrade() -> None:
    op.execute("SELECT 1")
