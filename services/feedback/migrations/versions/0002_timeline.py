"""events store (every email event of every account, and the recipients each is about), suppression
list import and export jobs, per-account suppressed reasons

Revision ID: feedback_timeline
Revises: feedback_0001
"""

import sqlalchemy as sa
from alembic import op

from postmesh.common.db import UTCDateTime

revision = "feedback_timeline"
down_revision = "feedback_0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "email_events",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("event_id", sa.String(64), nullable=False),
        sa.Column("account_id", sa.String(32), nullable=False),
        sa.Column("message_id", sa.String(128), nullable=False),
        sa.Column("event_type", sa.String(24), nullable=False),
        sa.Column("event_time", UTCDateTime(), nullable=False),
        sa.Column("payload", sa.LargeBinary(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_email_events")),
        sa.UniqueConstraint("event_id", name=op.f("uq_email_events_event_id")),
    )
    op.create_index("ix_email_events_account_time", "email_events", ["account_id", "event_time", "id"])
    op.create_index("ix_email_events_account_message", "email_events", ["account_id", "message_id"])
    op.create_index(op.f("ix_email_events_event_time"), "email_events", ["event_time"])
    op.create_table(
        "email_event_recipients",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("event_row_id", sa.Integer(), nullable=False),
        sa.Column("account_id", sa.String(32), nullable=False),
        sa.Column("address_key", sa.String(320), nullable=False),
        sa.ForeignKeyConstraint(
            ["event_row_id"],
            ["email_events.id"],
            name=op.f("fk_email_event_recipients_event_row_id_email_events"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_email_event_recipients")),
    )
    op.create_index(
        "ix_email_event_recipients_account_address", "email_event_recipients", ["account_id", "address_key"]
    )
    op.create_index(
        op.f("ix_email_event_recipients_event_row_id"), "email_event_recipients", ["event_row_id"]
    )

    op.create_table(
        "suppression_import_jobs",
        sa.Column("id", sa.String(32), nullable=False),
        sa.Column("account_id", sa.String(32), nullable=False),
        sa.Column("action", sa.String(8), nullable=False),
        sa.Column("data_format", sa.String(8), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("data", sa.LargeBinary(), nullable=False),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        sa.Column("completed_at", UTCDateTime(), nullable=True),
        sa.Column("processed_count", sa.Integer(), nullable=False),
        sa.Column("failed_count", sa.Integer(), nullable=False),
        sa.Column("error_message", sa.Text(), nullable=False),
        sa.Column("failures", sa.Text(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_suppression_import_jobs")),
    )
    op.create_index(op.f("ix_suppression_import_jobs_account_id"), "suppression_import_jobs", ["account_id"])
    op.create_index(op.f("ix_suppression_import_jobs_created_at"), "suppression_import_jobs", ["created_at"])
    op.create_table(
        "suppression_export_jobs",
        sa.Column("id", sa.String(32), nullable=False),
        sa.Column("account_id", sa.String(32), nullable=False),
        sa.Column("data_format", sa.String(8), nullable=False),
        sa.Column("reasons", sa.String(32), nullable=False),
        sa.Column("start_date", UTCDateTime(), nullable=True),
        sa.Column("end_date", UTCDateTime(), nullable=True),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        sa.Column("completed_at", UTCDateTime(), nullable=True),
        sa.Column("exported_count", sa.Integer(), nullable=False),
        sa.Column("error_message", sa.Text(), nullable=False),
        sa.Column("data", sa.LargeBinary(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_suppression_export_jobs")),
    )
    op.create_index(op.f("ix_suppression_export_jobs_account_id"), "suppression_export_jobs", ["account_id"])
    op.create_index(op.f("ix_suppression_export_jobs_created_at"), "suppression_export_jobs", ["created_at"])
    op.create_table(
        "account_suppression_attributes",
        sa.Column("account_id", sa.String(32), nullable=False),
        sa.Column("suppressed_reasons", sa.String(32), nullable=False),
        sa.Column("updated_at", UTCDateTime(), nullable=False),
        sa.PrimaryKeyConstraint("account_id", name=op.f("pk_account_suppression_attributes")),
    )


def downgrade() -> None:
    op.drop_table("account_suppression_attributes")
    op.drop_table("suppression_export_jobs")
    op.drop_table("suppression_import_jobs")
    op.drop_table("email_event_recipients")
    op.drop_table("email_events")
