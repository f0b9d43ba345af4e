"""SigV4 access keys of the HTTP API

Revision ID: identity_gateway
Revises: identity_destinations
"""

import sqlalchemy as sa
from alembic import op

from postmesh.common.db import UTCDateTime

revision = "identity_gateway"
down_revision = "identity_destinations"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "access_keys",
        sa.Column("access_key_id", sa.String(32), nullable=False),
        sa.Column("account_id", sa.String(32), nullable=False),
        sa.Column("encrypted_signing_key", sa.LargeBinary(), nullable=False),
        sa.Column("wrapped_data_key", sa.LargeBinary(), nullable=False),
        sa.Column("master_key_id", sa.String(64), nullable=False),
        sa.Column("description", sa.String(256), nullable=False),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        sa.Column("revoked_at", UTCDateTime(), nullable=True),
        sa.Column("last_used_at", UTCDateTime(), nullable=True),
        sa.ForeignKeyConstraint(
            ["account_id"],
            ["accounts.account_id"],
            name=op.f("fk_access_keys_account_id_accounts"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("access_key_id", name=op.f("pk_access_keys")),
    )
    op.create_index(op.f("ix_access_keys_account_id"), "access_keys", ["account_id"])


def downgrade() -> None:
    op.drop_index(op.f("ix_access_keys_account_id"), table_name="access_keys")
    op.drop_table("access_keys")
