"""where each frame lies in an instance's blob (issue 20): read by range, not whole

Revision ID: 0013
Revises: 0012
"""

import sqlalchemy as sa
from alembic import op

revision = "0013"
down_revision = "0012"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # additive: a node of the version before ignores the column, and its rows stay without
    # a table (their frames are read from the whole object, as before)
    op.add_column("instances", sa.Column("frame_table", sa.Text(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("instances") as batch:
        batch.drop_column("frame_table")
