"""recipient copies: destruction confirmations and notices owed to recipients

Revision ID: 0011
Revises: 0008
"""

import sqlalchemy as sa
from alembic import op

revision = "0011"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "destruction_confirmations",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("recipient", sa.String(), nullable=False),
        sa.Column("study_instance_uid", sa.String(length=64), nullable=False),
        sa.Column("confirmed_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("evidence", sa.Text(), server_default="", nullable=False),
        sa.Column("recorded_by", sa.String(), nullable=False),
        sa.Column("recorded_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_destruction_confirmations")),
    )
    op.create_index(
        "ix_destruction_confirmations_recipient", "destruction_confirmations", ["recipient"]
    )
    op.create_table(
        "recipient_notices",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("source_seq", sa.Integer(), nullable=False),
        sa.Column("recipient", sa.String(), nullable=False),
        sa.Column("patient_id", sa.String(), nullable=False),
        sa.Column("studies", sa.Text(), nullable=False),
        sa.Column("reason", sa.String(length=32), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("queued_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("sent_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("sent_by", sa.String(), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_recipient_notices")),
        sa.UniqueConstraint(
            "source_seq", "recipient", name=op.f("uq_recipient_notices_source_seq")
        ),
    )


def downgrade() -> None:
    op.drop_table("recipient_notices")
    op.drop_index("ix_destruction_confirmations_recipient", table_name="destruction_confirmations")
    op.drop_table("destruction_confirmations")
