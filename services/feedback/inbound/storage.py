"""The inbound side's tables: the index of sent messages and the kept reports (no rules here)."""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Iterable, Sequence
from typing import cast

from sqlalchemy import Table, delete, select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from postmesh.common.db import insert_ignoring_duplicates, transaction
from postmesh.common.errors import NotFound
from postmesh.common.paging import keyset_page, split_page
from postmesh.common.protoutil import from_timestamp
from postmesh.common.service import Clock
from postmesh.events.v1 import events_pb2 as ev
from services.feedback.inbound.mimeparts import message_id_in
from services.feedback.models import KeptReport, SentMessage


def header_message_id(mail: ev.Mail) -> str:
    for header in mail.headers:
        if header.name.lower() == "message-id":
            return message_id_in(header.value)[:255]
    return ""


class SentMessages:
    def __init__(self, sessions: async_sessionmaker[AsyncSession], clock: Clock) -> None:
        self._sessions = sessions
        self._clock = clock
        self._add_new = insert_ignoring_duplicates(
            sessions, cast(Table, SentMessage.__table__), ["message_id"]
        )

    async def record(self, account_id: str, mail: ev.Mail) -> None:
        """Indexes one Send event's message (idempotent: a redelivered event changes nothing)."""
        await self.record_many([(account_id, mail)])

    async def record_many(self, sent: Iterable[tuple[str, ev.Mail]]) -> None:
        """Indexes the messages of a batch of Send events in one statement (an executemany); a
        message indexed before, by a redelivered event or an earlier one of the batch, is left as it
        is. Rows go in key order, so that two replicas inserting the same ones on PostgreSQL wait
        for each other instead of deadlocking."""
        rows: dict[str, dict[str, object]] = {}
        now = self._clock.now()
        for account_id, mail in sent:
            if mail.message_id in rows:
                continue
            rows[mail.message_id] = {
                "message_id": mail.message_id,
                "account_id": account_id,
                "header_message_id": header_message_id(mail),
                "mail": mail.SerializeToString(),
                "sent_at": from_timestamp(mail.timestamp) or now,
            }
        if not rows:
            return
        async with transaction(self._sessions) as session:
            await session.execute(self._add_new, [rows[key] for key in sorted(rows)])

    async def by_id(self, message_id: str) -> SentMessage | None:
        async with self._sessions() as session:
            return await session.get(SentMessage, message_id)

    async def by_header(self, header_id: str) -> SentMessage | None:
        if not header_id:
            return None
        async with self._sessions() as session:
            return await session.scalar(
                select(SentMessage).where(SentMessage.header_message_id == header_id[:255]).limit(1)
            )

    async def forget_before(self, cutoff: dt.datetime) -> int:
        async with transaction(self._sessions) as session:
            result = await session.execute(delete(SentMessage).where(SentMessage.sent_at < cutoff))
        return int(result.rowcount or 0)  # type: ignore[attr-defined]


class KeptReports:
    def __init__(self, sessions: async_sessionmaker[AsyncSession], clock: Clock) -> None:
        self._sessions = sessions
        self._clock = clock

    async def keep(self, *, raw: bytes, mail_from: str, rcpt_to: Sequence[str], fmt: str, reason: str) -> str:
        now = self._clock.now()
        # Time-ordered, so the operator's list reads oldest first.
        report_id = f"{int(now.timestamp() * 1000):012x}{uuid.uuid4().hex[:20]}"
        async with transaction(self._sessions) as session:
            session.add(
                KeptReport(
                    id=report_id,
                    received_at=now,
                    mail_from=mail_from[:320],
                    rcpt_to="\n".join(rcpt_to),
                    format=fmt[:32],
                    reason=reason,
                    raw=raw,
                )
            )
        return report_id

    async def get(self, report_id: str) -> KeptReport:
        async with self._sessions() as session:
            row = await session.get(KeptReport, report_id)
        if row is None:
            raise NotFound(f"No kept report {report_id}.")
        return row

    async def list(self, page_size: int, page_token: str) -> tuple[Sequence[KeptReport], str]:
        statement, size = keyset_page(select(KeptReport), KeptReport.id, page_size, page_token)
        async with self._sessions() as session:
            rows = (await session.scalars(statement)).all()
        return split_page(rows, size, lambda r: r.id)

    async def update_reason(self, report_id: str, reason: str) -> None:
        async with transaction(self._sessions) as session:
            row = await session.get(KeptReport, report_id)
            if row is not None:
                row.reason = reason

    async def forget_before(self, cutoff: dt.datetime) -> int:
        async with transaction(self._sessions) as session:
            result = await session.execute(delete(KeptReport).where(KeptReport.received_at < cutoff))
        return int(result.rowcount or 0)  # type: ignore[attr-defined]

    async def remove(self, report_id: str) -> None:
        async with transaction(self._sessions) as session:
            await session.execute(delete(KeptReport).where(KeptReport.id == report_id))
