"""Tables owned by the feedback service."""

from __future__ import annotations

import datetime as dt

from sqlalchemy import String, UniqueConstraint
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
