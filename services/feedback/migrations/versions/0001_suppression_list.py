"""account suppression list

Revision ID: feedback_0001
Revises:
"""

import sqlalchemy as sa
from alembic import op

from postmesh.common.db import UTCDateTime

revision = "feedback_0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "suppressed_destinations",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("account_id", sa.String(32), nullable=False),
        sa.Column("address_key", sa.String(320), nullable=False),
        sa.Column("email_address", sa.String(320), nullable=False),
        sa.Column("reason", sa.String(16), nullable=False),
        sa.Column("message_id", sa.String(128), nullable=False),
        sa.Column("feedback_id", sa.String(128), nullable=False),
        sa.Column("updated_at", UTCDateTime(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_suppressed_destinations")),
        sa.UniqueConstraint("account_id", "address_key", name=op.f("uq_suppressed_destinations_account_id")),
    )
    op.create_index(op.f("ix_suppressed_destinations_account_id"), "suppressed_destinations", ["account_id"])
    op.create_index(op.f("ix_suppressed_destinations_updated_at"), "suppressed_destinations", ["updated_at"])


def downgrade() -> None:
    op.drop_index(op.f("ix_suppressed_destinations_updated_at"), table_name="suppressed_destinations")
    op.drop_index(op.f("ix_suppressed_destinations_account_id"), table_name="suppressed_destinations")
    op.drop_table("suppressed_destinations")
