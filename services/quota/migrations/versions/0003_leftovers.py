"""held, released and dropped counts in the sending statistics

Revision ID: quota_leftovers
Revises: quota_0002
"""

import sqlalchemy as sa
from alembic import op

revision = "quota_leftovers"
down_revision = "quota_0002"
branch_labels = None
depends_on = None

_COLUMNS = ("held", "held_released", "held_dropped")


def upgrade() -> None:
    with op.batch_alter_table("send_stats") as batch:
        for name in _COLUMNS:
            batch.add_column(sa.Column(name, sa.Integer(), server_default="0", nullable=False))


def downgrade() -> None:
    with op.batch_alter_table("send_stats") as batch:
        for name in reversed(_COLUMNS):
            batch.drop_column(name)
