"""identity: the issuer of a legal hold's Patient ID, the recipients a consent names

Revision ID: 0007
Revises: 0006
"""

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("legal_holds") as batch:
        batch.add_column(sa.Column("issuer_of_patient_id", sa.String(), nullable=True))
    # consents is append-only (a trigger refuses UPDATE): add the column without rewriting rows
    op.add_column("consents", sa.Column("recipients", sa.Text(), server_default="", nullable=False))


def downgrade() -> None:
    op.drop_column("consents", "recipients")
    with op.batch_alter_table("legal_holds") as batch:
        batch.drop_column("issuer_of_patient_id")
