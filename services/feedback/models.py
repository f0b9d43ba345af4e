"""Tables owned by the feedback service."""

from __future__ import annotations

import datetime as dt

from sqlalchemy import LargeBinary, String, Text, UniqueConstraint
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
