"""studies retained only by law, stored apart (item 33)

Revision ID: 0017
Revises: 0015
"""

import sqlalchemy as sa
from alembic import op

revision = "0017"
down_revision = "0015"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "retained_studies",
        sa.Column("study_instance_uid", sa.String(length=64), nullable=False),
        sa.Column("patient_id", sa.String(), nullable=False),
        sa.Column("legal_basis", sa.String(length=64), nullable=False),
        sa.Column("rule_id", sa.String(length=64), nullable=False),
        sa.Column("retained_until", sa.DateTime(timezone=True), nullable=False),
        sa.Column("ground", sa.String(), nullable=False),
        sa.Column("retained_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("retained_by", sa.String(), nullable=False),
        sa.PrimaryKeyConstraint("study_instance_uid", name=op.f("pk_retained_studies")),
    )


def downgrade() -> None:
    op.drop_table("retained_studies")
