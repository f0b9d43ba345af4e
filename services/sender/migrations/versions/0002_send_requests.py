"""send requests (idempotency keys)

Revision ID: sender_0002
Revises: sender_0001
"""

import sqlalchemy as sa
from alembic import op

from postmesh.common.db import UTCDateTime

revision = "sender_0002"
down_revision = "sender_0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "send_requests",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("account_id", sa.String(32), nullable=False),
        sa.Column("request_id", sa.String(128), nullable=False),
        sa.Column("fingerprint", sa.String(64), nullable=False),
        sa.Column("message_ids", sa.Text(), nullable=False),
        sa.Column("result", sa.Text(), nullable=False),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        sa.Column("updated_at", UTCDateTime(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_send_requests")),
        sa.UniqueConstraint("account_id", "request_id", name=op.f("uq_send_requests_account_id")),
    )
    op.create_index(op.f("ix_send_requests_created_at"), "send_requests", ["created_at"])


def downgrade() -> None:
    op.drop_index(op.f("ix_send_requests_created_at"), table_name="send_requests")
    op.drop_table("send_requests")
