"""Each account's sending state and quota (domain code: no gRPC here)."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from postmesh.common.config import Settings
from postmesh.common.db import transaction
from postmesh.common.service import Clock
from services.quota.models import AccountQuota, SendLedgerEntry

WINDOW = dt.timedelta(hours=24)


@dataclass(frozen=True)
class AccountState:
    quota: AccountQuota
    sent_last_24_hours: int


class QuotaAccounts:
    def __init__(self, sessions: async_sessionmaker[AsyncSession], clock: Clock, settings: Settings) -> None:
        self._sessions = sessions
        self._clock = clock
        self._settings = settings

    async def _row(self, session: AsyncSession, account_id: str) -> AccountQuota:
        row = await session.get(AccountQuota, account_id)
        if row is None:
            # Every account starts in the sandbox.
            row = AccountQuota(
                account_id=account_id,
                production_access=False,
                sending_enabled=True,
                enforcement_status="HEALTHY",
                max_24_hour_send=self._settings.sandbox_max_24_hour_send,
                max_send_rate=self._settings.sandbox_max_send_rate,
                created_at=self._clock.now(),
            )
            session.add(row)
            await session.flush()
        return row

    async def state(self, account_id: str) -> AccountState:
        async with transaction(self._sessions) as session:
            row = await self._row(session, account_id)
            since = self._clock.now() - WINDOW
            sent = await session.scalar(
                select(func.coalesce(func.sum(SendLedgerEntry.messages), 0)).where(
                    SendLedgerEntry.account_id == account_id, SendLedgerEntry.at > since
                )
            )
        return AccountState(row, int(sent or 0))
