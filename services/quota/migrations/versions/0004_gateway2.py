"""an account's own pause of its sending (PutAccountSendingAttributes)

Revision ID: quota_gateway2
Revises: quota_leftovers
"""

import sqlalchemy as sa
from alembic import op

revision = "quota_gateway2"
down_revision = "quota_leftovers"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("account_quotas") as batch:
        batch.add_column(
            sa.Column("paused_by_account", sa.Boolean(), nullable=False, server_default=sa.false())
        )


def downgrade() -> None:
    with op.batch_alter_table("account_quotas") as batch:
        batch.drop_column("paused_by_account")
