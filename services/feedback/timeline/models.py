"""Tables of the events store (part of the feedback service's metadata)."""

from __future__ import annotations

import datetime as dt

from sqlalchemy import ForeignKey, Index, LargeBinary, String
from sqlalchemy.orm import Mapped, mapped_column

from postmesh.common.db import UTCDateTime
from services.feedback.models import Base


class StoredEmailEvent(Base):
    """One email event of one account, as published on NATS (the serialized postmesh.events.v1.Event)."""

    __tablename__ = "email_events"
    __table_args__ = (
        Index("ix_email_events_account_time", "account_id", "event_time", "id"),
        Index("ix_email_events_account_message", "account_id", "message_id"),
    )

    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=True)
    # Unique: a redelivered event is stored once.
    event_id: Mapped[str] = mapped_column(String(64), unique=True)
    account_id: Mapped[str] = mapped_column(String(32))
    message_id: Mapped[str] = mapped_column(String(128))
    event_type: Mapped[str] = mapped_column(String(24))
    event_time: Mapped[dt.datetime] = mapped_column(UTCDateTime(), index=True)
    payload: Mapped[bytes] = mapped_column(LargeBinary())


class EmailEventRecipient(Base):
    """A recipient an event is about (lower-cased), for ListEmailEvents' recipient filter."""

    __tablename__ = "email_event_recipients"
    __table_args__ = (Index("ix_email_event_recipients_account_address", "account_id", "address_key"),)

    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=True)
    event_row_id: Mapped[int] = mapped_column(ForeignKey("email_events.id", ondelete="CASCADE"), index=True)
    account_id: Mapped[str] = mapped_column(String(32))
    address_key: Mapped[str] = mapped_column(String(320))
