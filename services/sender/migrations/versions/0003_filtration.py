"""held messages and per-account spam policies (content filtration)

Revision ID: sender_filtration
Revises: sender_0002
"""

import sqlalchemy as sa
from alembic import op

from postmesh.common.db import UTCDateTime

revision = "sender_filtration"
down_revision = "sender_0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "held_messages",
        sa.Column("message_id", sa.String(64), nullable=False),
        sa.Column("account_id", sa.String(32), nullable=False),
        sa.Column("from_address", sa.Text(), nullable=False),
        sa.Column("subject", sa.Text(), nullable=False),
        sa.Column("spam_score", sa.Float(), nullable=False),
        sa.Column("details", sa.Text(), nullable=False),
        sa.Column("size_bytes", sa.Integer(), nullable=False),
        sa.Column("queued", sa.LargeBinary(), nullable=False),
        sa.Column("held_at", UTCDateTime(), nullable=False),
        sa.PrimaryKeyConstraint("message_id", name=op.f("pk_held_messages")),
    )
    op.create_index(op.f("ix_held_messages_account_id"), "held_messages", ["account_id"])
    op.create_index(op.f("ix_held_messages_held_at"), "held_messages", ["held_at"])
    op.create_table(
        "spam_policies",
        sa.Column("account_id", sa.String(32), nullable=False),
        sa.Column("mode", sa.String(16), nullable=False),
        sa.Column("threshold", sa.Float(), nullable=False),
        sa.Column("updated_at", UTCDateTime(), nullable=False),
        sa.PrimaryKeyConstraint("account_id", name=op.f("pk_spam_policies")),
    )


def downgrade() -> None:
    op.drop_table("spam_policies")
    op.drop_index(op.f("ix_held_messages_held_at"), table_name="held_messages")
    op.drop_index(op.f("ix_held_messages_account_id"), table_name="held_messages")
    op.drop_table("held_messages")
