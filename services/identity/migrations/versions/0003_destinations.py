"""default configuration set per identity

Revision ID: identity_destinations
Revises: identity_0002
"""

import sqlalchemy as sa
from alembic import op

revision = "identity_destinations"
down_revision = "identity_0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("email_identities") as batch:
        batch.add_column(
            sa.Column("configuration_set_name", sa.String(64), nullable=False, server_default="")
        )


def downgrade() -> None:
    with op.batch_alter_table("email_identities") as batch:
        batch.drop_column("configuration_set_name")
