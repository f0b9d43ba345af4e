"""Tables owned by the quota service."""

from __future__ import annotations

import datetime as dt

from sqlalchemy import BigInteger, Boolean, Float, Integer, String, Text, false
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from postmesh.common.db import UTCDateTime, service_metadata


class Base(DeclarativeBase):
    metadata = service_metadata()


class AccountQuota(Base):
    """One row per account: created with sandbox limits the first time the account is seen.

    The row is also the account's lock: every reservation starts by updating it, so reservations of
    one account are serialized by the database (a row lock on PostgreSQL, the write lock on SQLite)
    whichever quota-service replica handles them.
    """

    __tablename__ = "account_quotas"

    account_id: Mapped[str] = mapped_column(String(32), primary_key=True)
    production_access: Mapped[bool] = mapped_column(Boolean, default=False)
    # Whether the account may send now: not paused by enforcement (SHUTDOWN) nor by itself.
    sending_enabled: Mapped[bool] = mapped_column(Boolean, default=True)
    # The account paused its own sending (PutAccountSendingAttributes), whatever its enforcement.
    paused_by_account: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    enforcement_status: Mapped[str] = mapped_column(String(16), default="HEALTHY")
    max_24_hour_send: Mapped[float] = mapped_column(Float)
    max_send_rate: Mapped[float] = mapped_column(Float)
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime())
    # Token bucket of the send rate: the level at tokens_at (refilled lazily on each reservation).
    tokens: Mapped[float] = mapped_column(Float, default=0.0, server_default="0")
    tokens_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    # The rolling 24-hour count, kept incrementally: ledger entries newer than window_cutoff, summed.
    window_sent: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    window_cutoff: Mapped[dt.datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    enforcement_reason: Mapped[str] = mapped_column(String(512), default="", server_default="")
    # Reputation is judged on events from this time on (reset when an operator reinstates).
    reputation_since: Mapped[dt.datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    # The counts of reputation_since's 15-minute interval at that time, left out of the window.
    reputation_base_sends: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    reputation_base_bounces: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    reputation_base_complaints: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    quota_changed_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    # The latest PutAccountDetails.
    mail_type: Mapped[str] = mapped_column(String(16), default="", server_default="")
    website_url: Mapped[str] = mapped_column(String(1024), default="", server_default="")
    contact_language: Mapped[str] = mapped_column(String(8), default="", server_default="")
    use_case_description: Mapped[str] = mapped_column(Text, default="", server_default="")
    contact_addresses: Mapped[str] = mapped_column(Text, default="", server_default="")
    expected_daily_volume: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    review_case_id: Mapped[str] = mapped_column(String(32), default="", server_default="")


class SendLedgerEntry(Base):
    """Messages counted against the rolling 24-hour quota, one row per reservation (or lease)."""

    __tablename__ = "send_ledger"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    account_id: Mapped[str] = mapped_column(String(32), index=True)
    messages: Mapped[int] = mapped_column(Integer)
    at: Mapped[dt.datetime] = mapped_column(UTCDateTime(), index=True)


class AccountChangeRecord(Base):
    """Every change of an account's quota or sending state, with the state after it and why."""

    __tablename__ = "account_changes"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    account_id: Mapped[str] = mapped_column(String(32), index=True)
    at: Mapped[dt.datetime] = mapped_column(UTCDateTime())
    kind: Mapped[str] = mapped_column(String(32))
    reason: Mapped[str] = mapped_column(String(1024))
    actor: Mapped[str] = mapped_column(String(32))
    production_access: Mapped[bool] = mapped_column(Boolean)
    sending_enabled: Mapped[bool] = mapped_column(Boolean)
    enforcement_status: Mapped[str] = mapped_column(String(16))
    max_24_hour_send: Mapped[float] = mapped_column(Float)
    max_send_rate: Mapped[float] = mapped_column(Float)


class ProductionAccessCase(Base):
    """A request for production access, as filed by PutAccountDetails, and its decision."""

    __tablename__ = "production_access_requests"

    case_id: Mapped[str] = mapped_column(String(32), primary_key=True)
    account_id: Mapped[str] = mapped_column(String(32), index=True)
    status: Mapped[str] = mapped_column(String(16), index=True)
    mail_type: Mapped[str] = mapped_column(String(16))
    website_url: Mapped[str] = mapped_column(String(1024))
    contact_language: Mapped[str] = mapped_column(String(8))
    use_case_description: Mapped[str] = mapped_column(Text)
    contact_addresses: Mapped[str] = mapped_column(Text)
    expected_daily_volume: Mapped[int] = mapped_column(BigInteger)
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime())
    decided_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    decision_note: Mapped[str] = mapped_column(String(1024), default="")


class SendStatsSlot(Base):
    """Counts of one account's email events in one 15-minute interval."""

    __tablename__ = "send_stats"

    account_id: Mapped[str] = mapped_column(String(32), primary_key=True)
    slot_start: Mapped[dt.datetime] = mapped_column(UTCDateTime(), primary_key=True)
    delivery_attempts: Mapped[int] = mapped_column(Integer, default=0)
    bounces: Mapped[int] = mapped_column(Integer, default=0)
    complaints: Mapped[int] = mapped_column(Integer, default=0)
    rejects: Mapped[int] = mapped_column(Integer, default=0)
    # Messages held by the spam policy, and those an operator released or dropped (Hold events).
    held: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    held_released: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    held_dropped: Mapped[int] = mapped_column(Integer, default=0, server_default="0")


class ProcessedEvent(Base):
    """Event ids already counted, so a redelivered event is not counted twice."""

    __tablename__ = "processed_events"

    event_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    processed_at: Mapped[dt.datetime] = mapped_column(UTCDateTime(), index=True)


class ReputationPending(Base):
    """Accounts whose reputation counts changed since they were last judged. Written in the same
    transaction as the counts, so an account is judged even if the process dies before its judge
    runs; `version` grows with each change, so a change counted while the judge works keeps the row
    for the next round."""

    __tablename__ = "reputation_pending"

    account_id: Mapped[str] = mapped_column(String(32), primary_key=True)
    version: Mapped[int] = mapped_column(BigInteger, default=1)
