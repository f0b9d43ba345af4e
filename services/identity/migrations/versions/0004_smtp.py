"""SMTP credentials

Revision ID: identity_smtp
Revises: identity_hostile
"""

import sqlalchemy as sa
from alembic import op

from postmesh.common.db import UTCDateTime

revision = "identity_smtp"
down_revision = "identity_hostile"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "smtp_credentials",
        sa.Column("username", sa.String(32), nullable=False),
        sa.Column("account_id", sa.String(32), nullable=False),
        sa.Column("secret_hash", sa.String(64), nullable=False),
        sa.Column("description", sa.String(256), nullable=False),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        sa.Column("revoked_at", UTCDateTime(), nullable=True),
        sa.Column("last_used_at", UTCDateTime(), nullable=True),
        sa.ForeignKeyConstraint(
            ["account_id"],
            ["accounts.account_id"],
            name=op.f("fk_smtp_credentials_account_id_accounts"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("username", name=op.f("pk_smtp_credentials")),
    )
    op.create_index(op.f("ix_smtp_credentials_account_id"), "smtp_credentials", ["account_id"])


def downgrade() -> None:
    op.drop_index(op.f("ix_smtp_credentials_account_id"), table_name="smtp_credentials")
    op.drop_table("smtp_credentials")
