"""email feedback forwarding per identity

Revision ID: identity_inbound
Revises: identity_smtp
"""

import sqlalchemy as sa
from alembic import op

revision = "identity_inbound"
down_revision = "identity_smtp"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("email_identities") as batch:
        batch.add_column(sa.Column("feedback_forwarding", sa.Boolean(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("email_identities") as batch:
        batch.drop_column("feedback_forwarding")
