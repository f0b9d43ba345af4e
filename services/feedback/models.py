"""Tables owned by the feedback service."""

from __future__ import annotations

import datetime as dt

from sqlalchemy import Boolean, Float, Integer, LargeBinary, String, Text, UniqueConstraint
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from postmesh.common.db import UTCDateTime, service_metadata


class Base(DeclarativeBase):
    metadata = service_metadata()


class SuppressedDestination(Base):
    """An address the account will not send to (SES's account-level suppression list)."""

    __tablename__ = "suppressed_destinations"
    __table_args__ = (UniqueConstraint("account_id", "address_key"),)

    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=True)
    account_id: Mapped[str] = mapped_column(String(32), index=True)
    # Lower-cased address: the lookup key.
    address_key: Mapped[str] = mapped_column(String(320))
    email_address: Mapped[str] = mapped_column(String(320))
    reason: Mapped[str] = mapped_column(String(16))
    message_id: Mapped[str] = mapped_column(String(128), default="")
    feedback_id: Mapped[str] = mapped_column(String(128), default="")
    updated_at: Mapped[dt.datetime] = mapped_column(UTCDateTime(), index=True)


class SentMessage(Base):
    """A message postmesh sent, indexed so a report that comes back later maps to it and its account.
    Fed from Send events; `mail` is the event's Mail (protobuf), which later events repeat."""

    __tablename__ = "sent_messages"

    message_id: Mapped[str] = mapped_column(String(128), primary_key=True)
    account_id: Mapped[str] = mapped_column(String(32))
    # The RFC 5322 Message-ID without its angle brackets, as reports quote it.
    header_message_id: Mapped[str] = mapped_column(String(255), index=True)
    mail: Mapped[bytes] = mapped_column(LargeBinary)
    sent_at: Mapped[dt.datetime] = mapped_column(UTCDateTime(), index=True)


class KeptReport(Base):
    """Returned mail that maps to no message, or that nothing could read: kept for an operator."""

    __tablename__ = "kept_reports"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    received_at: Mapped[dt.datetime] = mapped_column(UTCDateTime(), index=True)
    mail_from: Mapped[str] = mapped_column(String(320))
    rcpt_to: Mapped[str] = mapped_column(Text)
    format: Mapped[str] = mapped_column(String(32))
    reason: Mapped[str] = mapped_column(Text)
    raw: Mapped[bytes] = mapped_column(LargeBinary)


class ConfigurationSet(Base):
    """SES's configuration set: options of the messages that name it."""

    __tablename__ = "configuration_sets"
    __table_args__ = (UniqueConstraint("account_id", "name"),)

    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=True)
    account_id: Mapped[str] = mapped_column(String(32), index=True)
    name: Mapped[str] = mapped_column(String(64))
    sending_enabled: Mapped[bool] = mapped_column(Boolean, default=True)
    # The sender's TlsPolicy name: OPTIONAL or REQUIRE.
    tls_policy: Mapped[str] = mapped_column(String(16), default="OPTIONAL")
    # SES's MaxDeliverySeconds; 0: the delivery workers' own maximum age.
    max_delivery_seconds: Mapped[int] = mapped_column(Integer, default=0)
    reputation_metrics_enabled: Mapped[bool] = mapped_column(Boolean, default=False)
    # Comma-separated reasons (BOUNCE, COMPLAINT) replacing the account's list; NULL: the account's.
    suppressed_reasons: Mapped[str | None] = mapped_column(String(64), nullable=True, default=None)
    custom_redirect_domain: Mapped[str] = mapped_column(String(253), default="")
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime())
    # The set's own spam policy (off, tag, hold, reject); "": none. Threshold 0: SPAM_THRESHOLD.
    spam_policy: Mapped[str] = mapped_column(String(16), default="", server_default="")
    spam_threshold: Mapped[float] = mapped_column(Float, default=0.0, server_default="0")


class EventDestination(Base):
    """Where a configuration set's events go: a webhook or a NATS subject."""

    __tablename__ = "event_destinations"
    __table_args__ = (UniqueConstraint("configuration_set_id", "name"),)

    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=True)
    configuration_set_id: Mapped[int] = mapped_column(Integer, index=True)
    account_id: Mapped[str] = mapped_column(String(32), index=True)
    name: Mapped[str] = mapped_column(String(64))
    enabled: Mapped[bool] = mapped_column(Boolean, default=True)
    # Comma-separated SES event type names (SEND, BOUNCE, ...).
    event_types: Mapped[str] = mapped_column(String(200))
    # "webhook" or "nats".
    kind: Mapped[str] = mapped_column(String(16))
    # Webhook URL, or the user's NATS subject.
    target: Mapped[str] = mapped_column(String(2048))
    # Webhook: JSON or SNS; NATS: JSON or PROTOBUF.
    format: Mapped[str] = mapped_column(String(16))
    subscription_status: Mapped[str] = mapped_column(String(32), default="CONFIRMED")
    # The webhook signing secret, sealed (AES-GCM) under the destinations' secrets key.
    sealed_secret: Mapped[bytes] = mapped_column(LargeBinary, default=b"")
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime())
    # SNS format: SignatureVersion (1: SHA1, 2: SHA256), the stable TopicArn, the confirmed
    # subscription's id (its SubscriptionArn is the TopicArn and this id; empty while pending), and
    # the SHA-256 of the token its SubscribeURL carries (the token itself goes out only in the handshake).
    signature_version: Mapped[int] = mapped_column(Integer, default=1, server_default="1")
    topic_arn: Mapped[str] = mapped_column(String(512), default="", server_default="", index=True)
    subscription_id: Mapped[str] = mapped_column(String(64), default="", server_default="")
    subscription_token_hash: Mapped[str] = mapped_column(String(64), default="", server_default="")


class WebhookDelivery(Base):
    """One event on its way to one webhook: pending (with its next attempt), or dead after the retry
    period (a dead letter, until an operator replays it). Delivered ones are deleted."""

    __tablename__ = "webhook_deliveries"
    __table_args__ = (UniqueConstraint("destination_id", "event_id"),)

    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=True)
    destination_id: Mapped[int] = mapped_column(Integer, index=True)
    account_id: Mapped[str] = mapped_column(String(32), index=True)
    event_id: Mapped[str] = mapped_column(String(64))
    # What the body is: "event" (SES event publishing JSON), "notification" or "notification+headers"
    # (an SES v1 identity notification, without or with the message headers).
    shape: Mapped[str] = mapped_column(String(24), default="event")
    # The postmesh.events.v1.Event, serialized: the body is rendered at each attempt.
    event: Mapped[bytes] = mapped_column(LargeBinary)
    dead: Mapped[bool] = mapped_column(Boolean, default=False, index=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    last_error: Mapped[str] = mapped_column(Text, default="")
    first_attempt_at: Mapped[dt.datetime] = mapped_column(UTCDateTime())
    next_attempt_at: Mapped[dt.datetime] = mapped_column(UTCDateTime(), index=True)
    dead_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime(), nullable=True, default=None)
