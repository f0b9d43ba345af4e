"""Tables owned by the quota service."""

from __future__ import annotations

import datetime as dt

from sqlalchemy import Boolean, Float, Integer, String
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from postmesh.common.db import UTCDateTime, service_metadata


class Base(DeclarativeBase):
    metadata = service_metadata()


class AccountQuota(Base):
    """One row per account: created with sandbox limits the first time the account is seen."""

    __tablename__ = "account_quotas"

    account_id: Mapped[str] = mapped_column(String(32), primary_key=True)
    production_access: Mapped[bool] = mapped_column(Boolean, default=False)
    sending_enabled: Mapped[bool] = mapped_column(Boolean, default=True)
    enforcement_status: Mapped[str] = mapped_column(String(16), default="HEALTHY")
    max_24_hour_send: Mapped[float] = mapped_column(Float)
    max_send_rate: Mapped[float] = mapped_column(Float)
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime())


class SendLedgerEntry(Base):
    """Messages counted against the rolling 24-hour quota, one row per reservation."""

    __tablename__ = "send_ledger"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    account_id: Mapped[str] = mapped_column(String(32), index=True)
    messages: Mapped[int] = mapped_column(Integer)
    at: Mapped[dt.datetime] = mapped_column(UTCDateTime(), index=True)
