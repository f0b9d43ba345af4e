"""Tables of the suppression list jobs and account settings (part of the feedback service's metadata)."""

from __future__ import annotations

import datetime as dt

from sqlalchemy import LargeBinary, String, Text
from sqlalchemy.orm import Mapped, mapped_column

from postmesh.common.db import UTCDateTime
from services.feedback.models import Base


class SuppressionImportJob(Base):
    __tablename__ = "suppression_import_jobs"

    # Time-ordered: listing by id lists oldest first.
    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    account_id: Mapped[str] = mapped_column(String(32), index=True)
    action: Mapped[str] = mapped_column(String(8))
    data_format: Mapped[str] = mapped_column(String(8))
    status: Mapped[str] = mapped_column(String(16))
    # The file until the job is done, then emptied.
    data: Mapped[bytes] = mapped_column(LargeBinary())
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime(), index=True)
    completed_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    processed_count: Mapped[int] = mapped_column(default=0)
    failed_count: Mapped[int] = mapped_column(default=0)
    error_message: Mapped[str] = mapped_column(Text(), default="")
    # JSON list of the first failed records: [[number, raw, error], ...].
    failures: Mapped[str] = mapped_column(Text(), default="[]")


class SuppressionExportJob(Base):
    __tablename__ = "suppression_export_jobs"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    account_id: Mapped[str] = mapped_column(String(32), index=True)
    data_format: Mapped[str] = mapped_column(String(8))
    # Comma-separated; empty: every reason.
    reasons: Mapped[str] = mapped_column(String(32))
    start_date: Mapped[dt.datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    end_date: Mapped[dt.datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    status: Mapped[str] = mapped_column(String(16))
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime(), index=True)
    completed_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    exported_count: Mapped[int] = mapped_column(default=0)
    error_message: Mapped[str] = mapped_column(Text(), default="")
    data: Mapped[bytes] = mapped_column(LargeBinary())


class AccountSuppressionAttributes(Base):
    """SES's account SuppressionAttributes: which reasons suppress automatically for this account."""

    __tablename__ = "account_suppression_attributes"

    account_id: Mapped[str] = mapped_column(String(32), primary_key=True)
    # Comma-separated BOUNCE, COMPLAINT; empty: none.
    suppressed_reasons: Mapped[str] = mapped_column(String(32))
    updated_at: Mapped[dt.datetime] = mapped_column(UTCDateTime())
