"""accounts waiting for their reputation to be judged

Revision ID: quota_reputation_pending
Revises: quota_gateway2
"""

import sqlalchemy as sa
from alembic import op

revision = "quota_reputation_pending"
down_revision = "quota_gateway2"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "reputation_pending",
        sa.Column("account_id", sa.String(32), nullable=False),
        sa.Column("version", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("account_id", name=op.f("pk_reputation_pending")),
    )


def downgrade() -> None:
    op.drop_table("reputation_pending")
