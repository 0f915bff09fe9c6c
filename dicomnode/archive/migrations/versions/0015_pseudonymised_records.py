"""the pseudonymised-data register (PIPA Art. 28-4(3), Decree Art. 29-5(2))

Revision ID: 0015
Revises: 0014
"""

import sqlalchemy as sa
from alembic import op

revision = "0015"
down_revision = "0014"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # additive: a node of the version before neither reads nor writes the table
    op.create_table(
        "pseudonymised_records",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("delivery_id", sa.Integer(), nullable=True),
        sa.Column("processed_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("processed_by", sa.String(), nullable=False),
        sa.Column("purpose", sa.String(), nullable=False),
        sa.Column("activity", sa.String(), nullable=False),
        sa.Column("basis", sa.String(), nullable=False),
        sa.Column("recipient", sa.String(), nullable=False),
        sa.Column("recipient_name", sa.String(), nullable=False),
        sa.Column("recipient_country", sa.String(length=8), nullable=False),
        sa.Column("profile", sa.String(), nullable=False),
        sa.Column("method", sa.Text(), nullable=False),
        sa.Column("items", sa.Text(), nullable=False),
        sa.Column("patient_ids", sa.Text(), nullable=False),
        sa.Column("study_instance_uid", sa.String(length=64), nullable=False),
        sa.Column("instances", sa.Integer(), nullable=False),
        sa.Column("instances_sent", sa.Integer(), nullable=False),
        sa.Column("withheld", sa.Integer(), nullable=False),
        sa.Column("last_sent_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("period", sa.String(length=32), nullable=False),
        sa.Column("period_end", sa.DateTime(timezone=True), nullable=True),
        sa.Column("policy_version", sa.String(), nullable=False),
        sa.Column("destroyed_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("destroyed_how", sa.Text(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_pseudonymised_records")),
        sa.UniqueConstraint("delivery_id", name=op.f("uq_pseudonymised_records_delivery_id")),
    )
    op.create_index(
        "ix_pseudonymised_records_study_instance_uid",
        "pseudonymised_records",
        ["study_instance_uid"],
    )


def downgrade() -> None:
    op.drop_index("ix_pseudonymised_records_study_instance_uid", table_name="pseudonymised_records")
    op.drop_table("pseudonymised_records")
