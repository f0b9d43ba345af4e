"""Tables owned by the identity service."""

from __future__ import annotations

import datetime as dt

from sqlalchemy import Boolean, ForeignKey, Integer, LargeBinary, String, Text, UniqueConstraint, false
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from postmesh.common.db import UTCDateTime, service_metadata


class Base(DeclarativeBase):
    metadata = service_metadata()


class Account(Base):
    __tablename__ = "accounts"

    account_id: Mapped[str] = mapped_column(String(32), primary_key=True)
    name: Mapped[str] = mapped_column(String(128))
    status: Mapped[str] = mapped_column(String(16), default="ACTIVE")
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime())


class ApiKey(Base):
    __tablename__ = "api_keys"

    key_id: Mapped[str] = mapped_column(String(32), primary_key=True)
    account_id: Mapped[str] = mapped_column(ForeignKey("accounts.account_id", ondelete="CASCADE"), index=True)
    # sha256 of the secret part; the secret itself is never stored.
    secret_hash: Mapped[str] = mapped_column(String(64))
    description: Mapped[str] = mapped_column(String(256), default="")
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime())
    revoked_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    last_used_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime(), nullable=True)


class EmailIdentity(Base):
    """A verified (or verifying) email address or domain of one account.

    The same name may be an identity of several accounts (SES allows it); nothing is shared between
    them: each has its own token, keys and status.
    """

    __tablename__ = "email_identities"
    __table_args__ = (UniqueConstraint("account_id", "identity_key"),)

    identity_id: Mapped[str] = mapped_column(String(32), primary_key=True)
    account_id: Mapped[str] = mapped_column(ForeignKey("accounts.account_id", ondelete="CASCADE"), index=True)
    # As stored and shown: local part as given, domain as a lower-case A-label.
    identity: Mapped[str] = mapped_column(String(320))
    # The comparison form (all lower case).
    identity_key: Mapped[str] = mapped_column(String(320), index=True)
    identity_type: Mapped[str] = mapped_column(String(16))
    verification_status: Mapped[str] = mapped_column(String(24))
    # Domains: the value expected in the _postmesh.<domain> TXT record.
    verification_token: Mapped[str] = mapped_column(String(64), default="")
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime())
    last_checked_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    last_success_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    next_check_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime(), nullable=True, index=True)
    # Consecutive unsuccessful checks: the backoff exponent.
    check_failures: Mapped[int] = mapped_column(Integer, default=0)
    error_type: Mapped[str] = mapped_column(String(32), default="")
    error_message: Mapped[str] = mapped_column(String(512), default="")
    dkim_signing_enabled: Mapped[bool] = mapped_column(Boolean, default=True)
    dkim_origin: Mapped[str] = mapped_column(String(16), default="")
    dkim_status: Mapped[str] = mapped_column(String(24), default="NOT_STARTED")
    dkim_next_key_bits: Mapped[int] = mapped_column(Integer, default=2048)
    dkim_generated_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    mail_from_domain: Mapped[str] = mapped_column(String(255), default="")
    mail_from_status: Mapped[str] = mapped_column(String(24), default="")
    mail_from_behavior: Mapped[str] = mapped_column(String(24), default="USE_DEFAULT_VALUE")
    # Whether the last check found the SPF record postmesh asks for at the MAIL FROM domain.
    mail_from_spf_found: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    # Email feedback forwarding; None: FEEDBACK_FORWARDING_DEFAULT (on, as SES has it).
    feedback_forwarding: Mapped[bool | None] = mapped_column(Boolean, nullable=True, default=None)
    # Addresses: when the last verification message was queued (resend rate limit).
    last_email_sent_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    # The default configuration set of sends from this identity that name none.
    configuration_set_name: Mapped[str] = mapped_column(String(64), default="")
    # SES v1 identity notifications: "<set>/<destination>" per type, headers or not (feedback forwarding
    # is the feedback_forwarding column above).
    bounce_destination: Mapped[str] = mapped_column(String(130), default="")
    complaint_destination: Mapped[str] = mapped_column(String(130), default="")
    delivery_destination: Mapped[str] = mapped_column(String(130), default="")
    headers_in_bounce: Mapped[bool] = mapped_column(Boolean, default=False)
    headers_in_complaint: Mapped[bool] = mapped_column(Boolean, default=False)
    headers_in_delivery: Mapped[bool] = mapped_column(Boolean, default=False)


class DkimKey(Base):
    """A DKIM key of a domain identity. The private key is encrypted under a per-key data key, which
    is itself encrypted under a master key from configuration (envelope encryption)."""

    __tablename__ = "dkim_keys"

    key_id: Mapped[str] = mapped_column(String(32), primary_key=True)
    identity_id: Mapped[str] = mapped_column(
        ForeignKey("email_identities.identity_id", ondelete="CASCADE"), index=True
    )
    selector: Mapped[str] = mapped_column(String(63))
    algorithm: Mapped[str] = mapped_column(String(16))
    key_bits: Mapped[int] = mapped_column(Integer)
    # ACTIVE, NEXT (a rotation waiting for its record) or RETIRED.
    state: Mapped[str] = mapped_column(String(16))
    # Base64, as the DNS record's p= tag carries it.
    public_key: Mapped[str] = mapped_column(Text)
    encrypted_private_key: Mapped[bytes] = mapped_column(LargeBinary)
    wrapped_data_key: Mapped[bytes] = mapped_column(LargeBinary)
    master_key_id: Mapped[str] = mapped_column(String(64))
    found: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime())


class VerificationToken(Base):
    """A single-use confirmation token of an address identity; only its hash is stored."""

    __tablename__ = "verification_tokens"

    token_hash: Mapped[str] = mapped_column(String(64), primary_key=True)
    identity_id: Mapped[str] = mapped_column(
        ForeignKey("email_identities.identity_id", ondelete="CASCADE"), index=True
    )
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime())
    expires_at: Mapped[dt.datetime] = mapped_column(UTCDateTime())
    used_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime(), nullable=True)


class IdentityPolicy(Base):
    """A sending authorization policy (SES's JSON format) attached to an identity."""

    __tablename__ = "identity_policies"

    identity_id: Mapped[str] = mapped_column(
        ForeignKey("email_identities.identity_id", ondelete="CASCADE"), primary_key=True
    )
    policy_name: Mapped[str] = mapped_column(String(64), primary_key=True)
    policy: Mapped[str] = mapped_column(Text)
    updated_at: Mapped[dt.datetime] = mapped_column(UTCDateTime())


class SmtpCredential(Base):
    """A user name and password for the SMTP submission server, acting for one account."""

    __tablename__ = "smtp_credentials"

    username: Mapped[str] = mapped_column(String(32), primary_key=True)
    account_id: Mapped[str] = mapped_column(ForeignKey("accounts.account_id", ondelete="CASCADE"), index=True)
    # sha256 of the password (256 random bits); the password itself is never stored.
    secret_hash: Mapped[str] = mapped_column(String(64))
    description: Mapped[str] = mapped_column(String(256), default="")
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime())
    revoked_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    last_used_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime(), nullable=True)


class AccessKey(Base):
    """A SigV4 access key of the HTTP API. The secret is never stored: only SHA-256("AWS4" + secret),
    which is what HMAC uses as the key anyway for a key longer than its block (docs/http-api.md),
    sealed like a DKIM key under a per-key data key and a master key."""

    __tablename__ = "access_keys"

    access_key_id: Mapped[str] = mapped_column(String(32), primary_key=True)
    account_id: Mapped[str] = mapped_column(ForeignKey("accounts.account_id", ondelete="CASCADE"), index=True)
    encrypted_signing_key: Mapped[bytes] = mapped_column(LargeBinary)
    wrapped_data_key: Mapped[bytes] = mapped_column(LargeBinary)
    master_key_id: Mapped[str] = mapped_column(String(64))
    description: Mapped[str] = mapped_column(String(256), default="")
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime())
    revoked_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    last_used_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime(), nullable=True)
