"""email templates

Revision ID: sender_0001
Revises:
"""

import sqlalchemy as sa
from alembic import op

from postmesh.common.db import UTCDateTime

revision = "sender_0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "email_templates",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("account_id", sa.String(32), nullable=False),
        sa.Column("name", sa.String(64), nullable=False),
        sa.Column("subject", sa.Text(), nullable=False),
        sa.Column("text", sa.Text(), nullable=False),
        sa.Column("html", sa.Text(), nullable=False),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        sa.Column("updated_at", UTCDateTime(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_email_templates")),
        sa.UniqueConstraint("account_id", "name", name=op.f("uq_email_templates_account_id")),
    )
    op.create_index(op.f("ix_email_templates_account_id"), "email_templates", ["account_id"])


def downgrade() -> None:
    op.drop_index(op.f("ix_email_templates_account_id"), table_name="email_templates")
    op.drop_table("email_templates")
