"""study access tags (issue 21, item 41)

Revision ID: 0012
Revises: 0011
"""

import sqlalchemy as sa
from alembic import op

revision = "0012"
down_revision = "0011"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "study_access_tags",
        sa.Column("study_instance_uid", sa.String(length=64), nullable=False),
        sa.Column("tag", sa.String(length=64), nullable=False),
        sa.PrimaryKeyConstraint("study_instance_uid", "tag", name=op.f("pk_study_access_tags")),
    )
    op.create_index("ix_study_access_tags_tag", "study_access_tags", ["tag"])


def downgrade() -> None:
    op.drop_index("ix_study_access_tags_tag", table_name="study_access_tags")
    op.drop_table("study_access_tags")
