"""Tables owned by the sender service."""

from __future__ import annotations

import datetime as dt

from sqlalchemy import Float, LargeBinary, String, Text, UniqueConstraint
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from postmesh.common.db import UTCDateTime, service_metadata


class Base(DeclarativeBase):
    metadata = service_metadata()


class EmailTemplate(Base):
    __tablename__ = "email_templates"
    __table_args__ = (UniqueConstraint("account_id", "name"),)

    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=True)
    account_id: Mapped[str] = mapped_column(String(32), index=True)
    name: Mapped[str] = mapped_column(String(64))
    subject: Mapped[str] = mapped_column(Text, default="")
    text: Mapped[str] = mapped_column(Text, default="")
    html: Mapped[str] = mapped_column(Text, default="")
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime())
    updated_at: Mapped[dt.datetime] = mapped_column(UTCDateTime())


class SendRequest(Base):
    """A client's idempotency key (request_id) for SendEmail or SendBulkEmail, kept for a day.

    The message ids are drawn when the key is first seen, so a retry after a crash reuses them (and
    JetStream's de-duplication drops a second copy); `result` is empty until the messages are queued.
    """

    __tablename__ = "send_requests"
    __table_args__ = (UniqueConstraint("account_id", "request_id"),)

    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=True)
    account_id: Mapped[str] = mapped_column(String(32))
    request_id: Mapped[str] = mapped_column(String(128))
    # sha256 of the request, so a key reused for another request is refused.
    fingerprint: Mapped[str] = mapped_column(String(64))
    message_ids: Mapped[str] = mapped_column(Text)
    result: Mapped[str] = mapped_column(Text, default="")
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime(), index=True)
    updated_at: Mapped[dt.datetime] = mapped_column(UTCDateTime())


class HeldMessage(Base):
    """A message the spam policy held for an operator: the queued message itself, body inline."""

    __tablename__ = "held_messages"

    message_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    account_id: Mapped[str] = mapped_column(String(32), index=True)
    from_address: Mapped[str] = mapped_column(Text)
    subject: Mapped[str] = mapped_column(Text, default="")
    spam_score: Mapped[float] = mapped_column(Float)
    details: Mapped[str] = mapped_column(Text)
    size_bytes: Mapped[int] = mapped_column()
    # A serialized postmesh.sender.v1.QueuedMessage with the MIME inline.
    queued: Mapped[bytes] = mapped_column(LargeBinary)
    held_at: Mapped[dt.datetime] = mapped_column(UTCDateTime(), index=True)


class SpamPolicyOverride(Base):
    """An account's own spam policy; accounts without one follow SPAM_POLICY / SPAM_THRESHOLD."""

    __tablename__ = "spam_policies"

    account_id: Mapped[str] = mapped_column(String(32), primary_key=True)
    mode: Mapped[str] = mapped_column(String(16))
    threshold: Mapped[float] = mapped_column(Float)
    updated_at: Mapped[dt.datetime] = mapped_column(UTCDateTime())
