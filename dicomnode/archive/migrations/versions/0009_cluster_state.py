"""cluster state: shared secrets, DPO sessions, failed sign-ins, leader leases

Revision ID: 0009
Revises: 0007
"""

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "node_secrets",
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("value", sa.LargeBinary(), nullable=False),
        sa.Column("origin", sa.String(length=16), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("name", name=op.f("pk_node_secrets")),
    )
    op.create_table(
        "dpo_sessions",
        sa.Column("id_sha256", sa.String(length=64), nullable=False),
        sa.Column("username", sa.String(), nullable=False),
        sa.Column("method", sa.String(length=16), nullable=False),
        sa.Column("opened_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id_sha256", name=op.f("pk_dpo_sessions")),
    )
    op.create_index("ix_dpo_sessions_opened_at", "dpo_sessions", ["opened_at"])
    op.create_table(
        "signin_failures",
        sa.Column("key", sa.String(length=160), nullable=False),
        sa.Column("failures", sa.Integer(), nullable=False),
        sa.Column("locked_until", sa.DateTime(timezone=True), nullable=True),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("key", name=op.f("pk_signin_failures")),
    )
    op.create_index("ix_signin_failures_updated_at", "signin_failures", ["updated_at"])
    op.create_table(
        "leader_leases",
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("holder", sa.String(length=160), nullable=False),
        sa.Column("acquired_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("name", name=op.f("pk_leader_leases")),
    )


def downgrade() -> None:
    op.drop_table("leader_leases")
    op.drop_index("ix_signin_failures_updated_at", table_name="signin_failures")
    op.drop_table("signin_failures")
    op.drop_index("ix_dpo_sessions_opened_at", table_name="dpo_sessions")
    op.drop_table("dpo_sessions")
    op.drop_table("node_secrets")
