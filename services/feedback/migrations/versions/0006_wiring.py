"""SNS-format destinations: signature version, TopicArn, subscription id and token hash

Revision ID: feedback_wiring
Revises: feedback_leftovers
"""

import sqlalchemy as sa
from alembic import op

revision = "feedback_wiring"
down_revision = "feedback_leftovers"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("event_destinations") as batch:
        batch.add_column(sa.Column("signature_version", sa.Integer(), nullable=False, server_default="1"))
        batch.add_column(sa.Column("topic_arn", sa.String(512), nullable=False, server_default=""))
        batch.add_column(sa.Column("subscription_id", sa.String(64), nullable=False, server_default=""))
        batch.add_column(
            sa.Column("subscription_token_hash", sa.String(64), nullable=False, server_default="")
        )
    op.create_index(op.f("ix_event_destinations_topic_arn"), "event_destinations", ["topic_arn"])


def downgrade() -> None:
    op.drop_index(op.f("ix_event_destinations_topic_arn"), table_name="event_destinations")
    with op.batch_alter_table("event_destinations") as batch:
        batch.drop_column("subscription_token_hash")
        batch.drop_column("subscription_id")
        batch.drop_column("topic_arn")
        batch.drop_column("signature_version")
