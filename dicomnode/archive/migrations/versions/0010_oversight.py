"""oversight: four-eyes requests and deputies, break-glass grants, share links, consent provisions

Revision ID: 0010
Revises: 0009
"""

import sqlalchemy as sa
from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None


def _moment(name: str, nullable: bool = True) -> sa.Column:
    return sa.Column(name, sa.DateTime(timezone=True), nullable=nullable)


def upgrade() -> None:
    op.create_table(
        "approval_requests",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("action", sa.String(length=32), nullable=False),
        sa.Column("params", sa.Text(), nullable=False),
        sa.Column("summary", sa.Text(), server_default="", nullable=False),
        sa.Column("requested_by", sa.String(), nullable=False),
        _moment("requested_at", nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("decided_by", sa.String(), nullable=True),
        _moment("decided_at"),
        sa.Column("note", sa.Text(), server_default="", nullable=False),
        sa.Column("outcome", sa.Text(), server_default="", nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_approval_requests")),
    )
    op.create_index("ix_approval_requests_state", "approval_requests", ["state"])
    op.create_table(
        "approval_deputies",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("added_by", sa.String(), nullable=False),
        _moment("added_at", nullable=False),
        sa.Column("removed_by", sa.String(), nullable=True),
        _moment("removed_at"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_approval_deputies")),
        sa.UniqueConstraint("name", "added_at", name=op.f("uq_approval_deputies_name")),
    )
    op.create_table(
        "break_glass_grants",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("requester", sa.String(), nullable=False),
        sa.Column("patient_id", sa.String(), nullable=False),
        sa.Column("issuer_of_patient_id", sa.String(), server_default="", nullable=False),
        sa.Column("study_instance_uid", sa.String(length=64), nullable=True),
        sa.Column("reason", sa.Text(), nullable=False),
        _moment("granted_at", nullable=False),
        _moment("expires_at", nullable=False),
        _moment("ended_at"),
        sa.Column("reviewed_by", sa.String(), nullable=True),
        _moment("reviewed_at"),
        sa.Column("review_note", sa.Text(), server_default="", nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_break_glass_grants")),
    )
    op.create_index("ix_break_glass_grants_requester", "break_glass_grants", ["requester"])
    op.create_table(
        "share_links",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("token_sha256", sa.String(length=64), nullable=False),
        sa.Column("study_instance_uid", sa.String(length=64), nullable=False),
        sa.Column("recipient", sa.String(), server_default="", nullable=False),
        sa.Column("created_by", sa.String(), nullable=False),
        _moment("created_at", nullable=False),
        _moment("expires_at", nullable=False),
        _moment("revoked_at"),
        sa.Column("revoked_by", sa.String(), nullable=True),
        _moment("last_used_at"),
        sa.Column("uses", sa.Integer(), server_default="0", nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_share_links")),
        sa.UniqueConstraint("token_sha256", name=op.f("uq_share_links_token_sha256")),
    )
    op.create_table(
        "consent_provisions",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("patient_id", sa.String(), nullable=False),
        sa.Column("issuer_of_patient_id", sa.String(), server_default="", nullable=False),
        sa.Column("purpose", sa.String(length=16), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("fhir_id", sa.String(length=64), server_default="", nullable=False),
        sa.Column("provision", sa.Text(), nullable=False),
        _moment("imported_at", nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_consent_provisions")),
        sa.UniqueConstraint(
            "patient_id",
            "issuer_of_patient_id",
            "purpose",
            "version",
            name=op.f("uq_consent_provisions_patient_id"),
        ),
    )


def downgrade() -> None:
    op.drop_table("consent_provisions")
    op.drop_table("share_links")
    op.drop_index("ix_break_glass_grants_requester", table_name="break_glass_grants")
    op.drop_table("break_glass_grants")
    op.drop_table("approval_deputies")
    op.drop_index("ix_approval_requests_state", table_name="approval_requests")
    op.drop_table("approval_requests")
