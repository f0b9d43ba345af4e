"""configuration sets, event destinations, webhook deliveries

Revision ID: feedback_destinations
Revises: feedback_inbound
"""

import sqlalchemy as sa
from alembic import op

from postmesh.common.db import UTCDateTime

revision = "feedback_destinations"
down_revision = "feedback_inbound"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "configuration_sets",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("account_id", sa.String(32), nullable=False),
        sa.Column("name", sa.String(64), nullable=False),
        sa.Column("sending_enabled", sa.Boolean(), nullable=False),
        sa.Column("tls_policy", sa.String(16), nullable=False),
        sa.Column("max_delivery_seconds", sa.Integer(), nullable=False),
        sa.Column("reputation_metrics_enabled", sa.Boolean(), nullable=False),
        sa.Column("suppressed_reasons", sa.String(64), nullable=True),
        sa.Column("custom_redirect_domain", sa.String(253), nullable=False),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_configuration_sets")),
        sa.UniqueConstraint("account_id", "name", name=op.f("uq_configuration_sets_account_id")),
    )
    op.create_index(op.f("ix_configuration_sets_account_id"), "configuration_sets", ["account_id"])
    op.create_table(
        "event_destinations",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("configuration_set_id", sa.Integer(), nullable=False),
        sa.Column("account_id", sa.String(32), nullable=False),
        sa.Column("name", sa.String(64), nullable=False),
        sa.Column("enabled", sa.Boolean(), nullable=False),
        sa.Column("event_types", sa.String(200), nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("target", sa.String(2048), nullable=False),
        sa.Column("format", sa.String(16), nullable=False),
        sa.Column("subscription_status", sa.String(32), nullable=False),
        sa.Column("sealed_secret", sa.LargeBinary(), nullable=False),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_event_destinations")),
        sa.UniqueConstraint(
            "configuration_set_id", "name", name=op.f("uq_event_destinations_configuration_set_id")
        ),
    )
    op.create_index(op.f("ix_event_destinations_account_id"), "event_destinations", ["account_id"])
    op.create_index(
        op.f("ix_event_destinations_configuration_set_id"), "event_destinations", ["configuration_set_id"]
    )
    op.create_table(
        "webhook_deliveries",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("destination_id", sa.Integer(), nullable=False),
        sa.Column("account_id", sa.String(32), nullable=False),
        sa.Column("event_id", sa.String(64), nullable=False),
        sa.Column("shape", sa.String(24), nullable=False),
        sa.Column("event", sa.LargeBinary(), nullable=False),
        sa.Column("dead", sa.Boolean(), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("last_error", sa.Text(), nullable=False),
        sa.Column("first_attempt_at", UTCDateTime(), nullable=False),
        sa.Column("next_attempt_at", UTCDateTime(), nullable=False),
        sa.Column("dead_at", UTCDateTime(), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_webhook_deliveries")),
        sa.UniqueConstraint("destination_id", "event_id", name=op.f("uq_webhook_deliveries_destination_id")),
    )
    op.create_index(op.f("ix_webhook_deliveries_account_id"), "webhook_deliveries", ["account_id"])
    op.create_index(op.f("ix_webhook_deliveries_dead"), "webhook_deliveries", ["dead"])
    op.create_index(op.f("ix_webhook_deliveries_destination_id"), "webhook_deliveries", ["destination_id"])
    op.create_index(op.f("ix_webhook_deliveries_next_attempt_at"), "webhook_deliveries", ["next_attempt_at"])


def downgrade() -> None:
    op.drop_table("webhook_deliveries")
    op.drop_table("event_destinations")
    op.drop_table("configuration_sets")
