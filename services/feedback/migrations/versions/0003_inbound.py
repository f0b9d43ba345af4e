"""sent message index and kept inbound reports

Revision ID: feedback_inbound
Revises: feedback_timeline
"""

import sqlalchemy as sa
from alembic import op

from postmesh.common.db import UTCDateTime

revision = "feedback_inbound"
down_revision = "feedback_timeline"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "sent_messages",
        sa.Column("message_id", sa.String(128), nullable=False),
        sa.Column("account_id", sa.String(32), nullable=False),
        sa.Column("header_message_id", sa.String(255), nullable=False),
        sa.Column("mail", sa.LargeBinary(), nullable=False),
        sa.Column("sent_at", UTCDateTime(), nullable=False),
        sa.PrimaryKeyConstraint("message_id", name=op.f("pk_sent_messages")),
    )
    op.create_index(op.f("ix_sent_messages_header_message_id"), "sent_messages", ["header_message_id"])
    op.create_index(op.f("ix_sent_messages_sent_at"), "sent_messages", ["sent_at"])
    op.create_table(
        "kept_reports",
        sa.Column("id", sa.String(32), nullable=False),
        sa.Column("received_at", UTCDateTime(), nullable=False),
        sa.Column("mail_from", sa.String(320), nullable=False),
        sa.Column("rcpt_to", sa.Text(), nullable=False),
        sa.Column("format", sa.String(32), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("raw", sa.LargeBinary(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_kept_reports")),
    )
    op.create_index(op.f("ix_kept_reports_received_at"), "kept_reports", ["received_at"])


def downgrade() -> None:
    op.drop_index(op.f("ix_kept_reports_received_at"), table_name="kept_reports")
    op.drop_table("kept_reports")
    op.drop_index(op.f("ix_sent_messages_sent_at"), table_name="sent_messages")
    op.drop_index(op.f("ix_sent_messages_header_message_id"), table_name="sent_messages")
    op.drop_table("sent_messages")
