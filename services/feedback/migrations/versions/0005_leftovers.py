"""a configuration set's own spam policy (PutConfigurationSetFiltrationOptions)

Revision ID: feedback_leftovers
Revises: feedback_destinations
"""

import sqlalchemy as sa
from alembic import op

revision = "feedback_leftovers"
down_revision = "feedback_destinations"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("configuration_sets") as batch:
        batch.add_column(sa.Column("spam_policy", sa.String(16), server_default="", nullable=False))
        batch.add_column(sa.Column("spam_threshold", sa.Float(), server_default="0", nullable=False))


def downgrade() -> None:
    with op.batch_alter_table("configuration_sets") as batch:
        batch.drop_column("spam_threshold")
        batch.drop_column("spam_policy")
