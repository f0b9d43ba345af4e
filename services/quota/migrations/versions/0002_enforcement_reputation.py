"""token bucket, rolling window, account details, change history, production access, statistics

Revision ID: quota_0002
Revises: quota_0001
"""

import sqlalchemy as sa
from alembic import op

from postmesh.common.db import UTCDateTime

revision = "quota_0002"
down_revision = "quota_0001"
branch_labels = None
depends_on = None

_NEW_ACCOUNT_COLUMNS: list[sa.Column[object]] = [
    sa.Column("tokens", sa.Float(), server_default="0", nullable=False),
    sa.Column("tokens_at", UTCDateTime(), nullable=True),
    sa.Column("window_sent", sa.Integer(), server_default="0", nullable=False),
    sa.Column("window_cutoff", UTCDateTime(), nullable=True),
    sa.Column("enforcement_reason", sa.String(512), server_default="", nullable=False),
    sa.Column("reputation_since", UTCDateTime(), nullable=True),
    sa.Column("reputation_base_sends", sa.Integer(), server_default="0", nullable=False),
    sa.Column("reputation_base_bounces", sa.Integer(), server_default="0", nullable=False),
    sa.Column("reputation_base_complaints", sa.Integer(), server_default="0", nullable=False),
    sa.Column("quota_changed_at", UTCDateTime(), nullable=True),
    sa.Column("mail_type", sa.String(16), server_default="", nullable=False),
    sa.Column("website_url", sa.String(1024), server_default="", nullable=False),
    sa.Column("contact_language", sa.String(8), server_default="", nullable=False),
    sa.Column("use_case_description", sa.Text(), server_default="", nullable=False),
    sa.Column("contact_addresses", sa.Text(), server_default="", nullable=False),
    sa.Column("expected_daily_volume", sa.BigInteger(), server_default="0", nullable=False),
    sa.Column("review_case_id", sa.String(32), server_default="", nullable=False),
]


def upgrade() -> None:
    with op.batch_alter_table("account_quotas") as batch:
        for column in _NEW_ACCOUNT_COLUMNS:
            batch.add_column(column)
    op.create_table(
        "account_changes",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("account_id", sa.String(32), nullable=False),
        sa.Column("at", UTCDateTime(), nullable=False),
        sa.Column("kind", sa.String(32), nullable=False),
        sa.Column("reason", sa.String(1024), nullable=False),
        sa.Column("actor", sa.String(32), nullable=False),
        sa.Column("production_access", sa.Boolean(), nullable=False),
        sa.Column("sending_enabled", sa.Boolean(), nullable=False),
        sa.Column("enforcement_status", sa.String(16), nullable=False),
        sa.Column("max_24_hour_send", sa.Float(), nullable=False),
        sa.Column("max_send_rate", sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_account_changes")),
    )
    op.create_index(op.f("ix_account_changes_account_id"), "account_changes", ["account_id"])
    op.create_table(
        "production_access_requests",
        sa.Column("case_id", sa.String(32), nullable=False),
        sa.Column("account_id", sa.String(32), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("mail_type", sa.String(16), nullable=False),
        sa.Column("website_url", sa.String(1024), nullable=False),
        sa.Column("contact_language", sa.String(8), nullable=False),
        sa.Column("use_case_description", sa.Text(), nullable=False),
        sa.Column("contact_addresses", sa.Text(), nullable=False),
        sa.Column("expected_daily_volume", sa.BigInteger(), nullable=False),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        sa.Column("decided_at", UTCDateTime(), nullable=True),
        sa.Column("decision_note", sa.String(1024), nullable=False),
        sa.PrimaryKeyConstraint("case_id", name=op.f("pk_production_access_requests")),
    )
    op.create_index(
        op.f("ix_production_access_requests_account_id"), "production_access_requests", ["account_id"]
    )
    op.create_index(op.f("ix_production_access_requests_status"), "production_access_requests", ["status"])
    op.create_table(
        "send_stats",
        sa.Column("account_id", sa.String(32), nullable=False),
        sa.Column("slot_start", UTCDateTime(), nullable=False),
        sa.Column("delivery_attempts", sa.Integer(), nullable=False),
        sa.Column("bounces", sa.Integer(), nullable=False),
        sa.Column("complaints", sa.Integer(), nullable=False),
        sa.Column("rejects", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("account_id", "slot_start", name=op.f("pk_send_stats")),
    )
    op.create_table(
        "processed_events",
        sa.Column("event_id", sa.String(64), nullable=False),
        sa.Column("processed_at", UTCDateTime(), nullable=False),
        sa.PrimaryKeyConstraint("event_id", name=op.f("pk_processed_events")),
    )
    op.create_index(op.f("ix_processed_events_processed_at"), "processed_events", ["processed_at"])


def downgrade() -> None:
    op.drop_index(op.f("ix_processed_events_processed_at"), table_name="processed_events")
    op.drop_table("processed_events")
    op.drop_table("send_stats")
    op.drop_index(op.f("ix_production_access_requests_status"), table_name="production_access_requests")
    op.drop_index(op.f("ix_production_access_requests_account_id"), table_name="production_access_requests")
    op.drop_table("production_access_requests")
    op.drop_index(op.f("ix_account_changes_account_id"), table_name="account_changes")
    op.drop_table("account_changes")
    with op.batch_alter_table("account_quotas") as batch:
        for column in reversed(_NEW_ACCOUNT_COLUMNS):
            batch.drop_column(column.name)
