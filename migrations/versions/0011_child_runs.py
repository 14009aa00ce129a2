"""Child runs: steps of kind run (issue 15, part 4).

Reserved in the chain so that the parts of issue 15 can be built side by side; the part that
owns this revision fills it in.
"""

from alembic import op

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute("SELECT 1")


def downgrade() -> None:
    op.execute("SELECT 1")
