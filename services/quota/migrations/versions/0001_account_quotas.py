"""account quotas and the send ledger

Revision ID: quota_0001
Revises:
"""

import sqlalchemy as sa
from alembic import op

from postmesh.common.db import UTCDateTime

revision = "quota_0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "account_quotas",
        sa.Column("account_id", sa.String(32), nullable=False),
        sa.Column("production_access", sa.Boolean(), nullable=False),
        sa.Column("sending_enabled", sa.Boolean(), nullable=False),
        sa.Column("enforcement_status", sa.String(16), nullable=False),
        sa.Column("max_24_hour_send", sa.Float(), nullable=False),
        sa.Column("max_send_rate", sa.Float(), nullable=False),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        sa.PrimaryKeyConstraint("account_id", name=op.f("pk_account_quotas")),
    )
    op.create_table(
        "send_ledger",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("account_id", sa.String(32), nullable=False),
        sa.Column("messages", sa.Integer(), nullable=False),
        sa.Column("at", UTCDateTime(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_send_ledger")),
    )
    op.create_index(op.f("ix_send_ledger_account_id"), "send_ledger", ["account_id"])
    op.create_index(op.f("ix_send_ledger_at"), "send_ledger", ["at"])


def downgrade() -> None:
    op.drop_index(op.f("ix_send_ledger_at"), table_name="send_ledger")
    op.drop_index(op.f("ix_send_ledger_account_id"), table_name="send_ledger")
    op.drop_table("send_ledger")
    op.drop_table("account_quotas")
