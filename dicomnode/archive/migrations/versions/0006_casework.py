"""casework: breaches, data-subject request tickets, failed-authentication counts

Revision ID: 0006
Revises: 0004
"""

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "breaches",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("aware_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("occurred_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("what", sa.Text(), nullable=False),
        sa.Column("facts", sa.Text(), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("notifications", sa.Text(), server_default="[]", nullable=False),
        sa.Column("recorded_by", sa.String(), nullable=False),
        sa.Column("recorded_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("closed_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("closed_by", sa.String(), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_breaches")),
    )
    op.create_table(
        "subject_tickets",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("patient_id", sa.String(), nullable=False),
        sa.Column("issuer_of_patient_id", sa.String(), server_default="", nullable=False),
        sa.Column("requester", sa.String(), nullable=False),
        sa.Column("regimes", sa.String(length=16), nullable=False),
        sa.Column("details", sa.Text(), server_default="", nullable=False),
        sa.Column("received_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("due_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("exemptions", sa.Text(), server_default="[]", nullable=False),
        sa.Column("outcome", sa.Text(), server_default="", nullable=False),
        sa.Column("recorded_by", sa.String(), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_by", sa.String(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_subject_tickets")),
    )
    with op.batch_alter_table("subject_tickets", schema=None) as batch_op:
        batch_op.create_index("ix_subject_tickets_state", ["state"], unique=False)
    op.create_table(
        "auth_failures",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("hour", sa.DateTime(timezone=True), nullable=False),
        sa.Column("kind", sa.String(length=32), nullable=False),
        sa.Column("address", sa.String(length=64), nullable=False),
        sa.Column("count", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_auth_failures")),
        sa.UniqueConstraint("hour", "kind", "address", name="uq_auth_failures_hour"),
    )


def downgrade() -> None:
    op.drop_table("auth_failures")
    with op.batch_alter_table("subject_tickets", schema=None) as batch_op:
        batch_op.drop_index("ix_subject_tickets_state")
    op.drop_table("subject_tickets")
    op.drop_table("breaches")
