"""default configuration set and notification settings per identity

Revision ID: identity_destinations
Revises: identity_inbound
"""

import sqlalchemy as sa
from alembic import op

revision = "identity_destinations"
down_revision = "identity_inbound"
branch_labels = None
depends_on = None

_KINDS = ("bounce", "complaint", "delivery")


def upgrade() -> None:
    with op.batch_alter_table("email_identities") as batch:
        batch.add_column(
            sa.Column("configuration_set_name", sa.String(64), nullable=False, server_default="")
        )
        for kind in _KINDS:
            batch.add_column(
                sa.Column(f"{kind}_destination", sa.String(130), nullable=False, server_default="")
            )
            batch.add_column(
                sa.Column(f"headers_in_{kind}", sa.Boolean(), nullable=False, server_default=sa.false())
            )


def downgrade() -> None:
    with op.batch_alter_table("email_identities") as batch:
        for kind in _KINDS:
            batch.drop_column(f"{kind}_destination")
            batch.drop_column(f"headers_in_{kind}")
        batch.drop_column("configuration_set_name")
