"""whether the custom MAIL FROM domain's SPF record was found

Revision ID: identity_hostile
Revises: identity_0002
"""

import sqlalchemy as sa
from alembic import op

revision = "identity_hostile"
down_revision = "identity_0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column(
        "email_identities",
        sa.Column("mail_from_spf_found", sa.Boolean(), nullable=False, server_default=sa.false()),
    )


def downgrade() -> None:
    op.drop_column("email_identities", "mail_from_spf_found")
