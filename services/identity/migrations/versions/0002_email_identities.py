"""email identities, DKIM keys, verification tokens, sending authorization policies

Revision ID: identity_0002
Revises: identity_0001
"""

import sqlalchemy as sa
from alembic import op

from postmesh.common.db import UTCDateTime

revision = "identity_0002"
down_revision = "identity_0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "email_identities",
        sa.Column("identity_id", sa.String(32), nullable=False),
        sa.Column("account_id", sa.String(32), nullable=False),
        sa.Column("identity", sa.String(320), nullable=False),
        sa.Column("identity_key", sa.String(320), nullable=False),
        sa.Column("identity_type", sa.String(16), nullable=False),
        sa.Column("verification_status", sa.String(24), nullable=False),
        sa.Column("verification_token", sa.String(64), nullable=False),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        sa.Column("last_checked_at", UTCDateTime(), nullable=True),
        sa.Column("last_success_at", UTCDateTime(), nullable=True),
        sa.Column("next_check_at", UTCDateTime(), nullable=True),
        sa.Column("check_failures", sa.Integer(), nullable=False),
        sa.Column("error_type", sa.String(32), nullable=False),
        sa.Column("error_message", sa.String(512), nullable=False),
        sa.Column("dkim_signing_enabled", sa.Boolean(), nullable=False),
        sa.Column("dkim_origin", sa.String(16), nullable=False),
        sa.Column("dkim_status", sa.String(24), nullable=False),
        sa.Column("dkim_next_key_bits", sa.Integer(), nullable=False),
        sa.Column("dkim_generated_at", UTCDateTime(), nullable=True),
        sa.Column("mail_from_domain", sa.String(255), nullable=False),
        sa.Column("mail_from_status", sa.String(24), nullable=False),
        sa.Column("mail_from_behavior", sa.String(24), nullable=False),
        sa.Column("last_email_sent_at", UTCDateTime(), nullable=True),
        sa.ForeignKeyConstraint(
            ["account_id"],
            ["accounts.account_id"],
            name=op.f("fk_email_identities_account_id_accounts"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("identity_id", name=op.f("pk_email_identities")),
        sa.UniqueConstraint("account_id", "identity_key", name=op.f("uq_email_identities_account_id")),
    )
    op.create_index(op.f("ix_email_identities_account_id"), "email_identities", ["account_id"])
    op.create_index(op.f("ix_email_identities_identity_key"), "email_identities", ["identity_key"])
    op.create_index(op.f("ix_email_identities_next_check_at"), "email_identities", ["next_check_at"])
    op.create_table(
        "dkim_keys",
        sa.Column("key_id", sa.String(32), nullable=False),
        sa.Column("identity_id", sa.String(32), nullable=False),
        sa.Column("selector", sa.String(63), nullable=False),
        sa.Column("algorithm", sa.String(16), nullable=False),
        sa.Column("key_bits", sa.Integer(), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("public_key", sa.Text(), nullable=False),
        sa.Column("encrypted_private_key", sa.LargeBinary(), nullable=False),
        sa.Column("wrapped_data_key", sa.LargeBinary(), nullable=False),
        sa.Column("master_key_id", sa.String(64), nullable=False),
        sa.Column("found", sa.Boolean(), nullable=False),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        sa.ForeignKeyConstraint(
            ["identity_id"],
            ["email_identities.identity_id"],
            name=op.f("fk_dkim_keys_identity_id_email_identities"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("key_id", name=op.f("pk_dkim_keys")),
    )
    op.create_index(op.f("ix_dkim_keys_identity_id"), "dkim_keys", ["identity_id"])
    op.create_table(
        "verification_tokens",
        sa.Column("token_hash", sa.String(64), nullable=False),
        sa.Column("identity_id", sa.String(32), nullable=False),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        sa.Column("expires_at", UTCDateTime(), nullable=False),
        sa.Column("used_at", UTCDateTime(), nullable=True),
        sa.ForeignKeyConstraint(
            ["identity_id"],
            ["email_identities.identity_id"],
            name=op.f("fk_verification_tokens_identity_id_email_identities"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("token_hash", name=op.f("pk_verification_tokens")),
    )
    op.create_index(op.f("ix_verification_tokens_identity_id"), "verification_tokens", ["identity_id"])
    op.create_table(
        "identity_policies",
        sa.Column("identity_id", sa.String(32), nullable=False),
        sa.Column("policy_name", sa.String(64), nullable=False),
        sa.Column("policy", sa.Text(), nullable=False),
        sa.Column("updated_at", UTCDateTime(), nullable=False),
        sa.ForeignKeyConstraint(
            ["identity_id"],
            ["email_identities.identity_id"],
            name=op.f("fk_identity_policies_identity_id_email_identities"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("identity_id", "policy_name", name=op.f("pk_identity_policies")),
    )


def downgrade() -> None:
    op.drop_table("identity_policies")
    op.drop_index(op.f("ix_verification_tokens_identity_id"), table_name="verification_tokens")
    op.drop_table("verification_tokens")
    op.drop_index(op.f("ix_dkim_keys_identity_id"), table_name="dkim_keys")
    op.drop_table("dkim_keys")
    op.drop_index(op.f("ix_email_identities_next_check_at"), table_name="email_identities")
    op.drop_index(op.f("ix_email_identities_identity_key"), table_name="email_identities")
    op.drop_index(op.f("ix_email_identities_account_id"), table_name="email_identities")
    op.drop_table("email_identities")
