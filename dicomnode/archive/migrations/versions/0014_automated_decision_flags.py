"""automated-decision flags (checklist item 9, PIPA 37-2)

Revision ID: 0014
Revises: 0013
"""

import sqlalchemy as sa
from alembic import op

revision = "0014"
down_revision = "0013"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "automated_decision_flags",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("ticket_id", sa.Integer(), nullable=False),
        sa.Column("request", sa.String(length=16), nullable=False),
        sa.Column("patient_id", sa.String(), nullable=False),
        sa.Column("issuer_of_patient_id", sa.String(), server_default="", nullable=False),
        sa.Column("study_instance_uid", sa.String(length=64), server_default="", nullable=False),
        sa.Column("reviewer", sa.String(), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("flagged_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("resolved_at", sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(
            ["ticket_id"],
            ["subject_tickets.id"],
            name=op.f("fk_automated_decision_flags_ticket_id_subject_tickets"),
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_automated_decision_flags")),
        sa.UniqueConstraint("ticket_id", name=op.f("uq_automated_decision_flags_ticket_id")),
    )
    op.create_index(
        "ix_automated_decision_flags_patient_id", "automated_decision_flags", ["patient_id"]
    )


def downgrade() -> None:
    op.drop_index("ix_automated_decision_flags_patient_id", table_name="automated_decision_flags")
    op.drop_table("automated_decision_flags")
