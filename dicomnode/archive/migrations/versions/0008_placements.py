"""placements: the durable record of each placed blob's outcome (for stores without a journal)

Revision ID: 0008
Revises: 0010

0008 was reserved for this table; 0009 and 0010 were committed first, chained on 0007, so
this one follows 0010 to keep a single head (revision ids are names, not an order).
"""

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0010"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "placements",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("key", sa.String(), nullable=False),
        sa.Column("node", sa.String(length=160), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_placements_node", "placements", ["node"])
    op.create_index("ix_placements_key", "placements", ["key"])


def downgrade() -> None:
    op.drop_index("ix_placements_key", table_name="placements")
    op.drop_index("ix_placements_node", table_name="placements")
    op.drop_table("placements")
