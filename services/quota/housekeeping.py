"""Dropping what no limit, statistic or redelivery can need any more (domain code: no gRPC)."""

from __future__ import annotations

import asyncio
import datetime as dt
import logging

from sqlalchemy import delete, select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from postmesh.common.config import Settings
from postmesh.common.db import transaction
from postmesh.common.service import Clock
from services.quota.accounts import WINDOW, QuotaAccounts
from services.quota.models import AccountQuota, ProcessedEvent, SendLedgerEntry, SendStatsSlot
from services.quota.statistics import HISTORY

log = logging.getLogger(__name__)

INTERVAL_SECONDS = 3600.0
# Events older than the stream keeps them (14 days) are never redelivered.
EVENT_MEMORY = dt.timedelta(days=15)


class Housekeeping:
    def __init__(
        self,
        sessions: async_sessionmaker[AsyncSession],
        clock: Clock,
        settings: Settings,
        accounts: QuotaAccounts,
    ) -> None:
        self._sessions = sessions
        self._clock = clock
        self._settings = settings
        self._accounts = accounts

    async def run(self) -> None:
        while True:
            await asyncio.sleep(INTERVAL_SECONDS)
            await self.run_once()

    async def run_once(self) -> dict[str, int]:
        """Deletes old rows; returns how many of each kind."""
        now = self._clock.now()
        keep_stats = max(HISTORY, dt.timedelta(days=self._settings.reputation_window_days))
        cutoff = (
            select(AccountQuota.window_cutoff)
            .where(AccountQuota.account_id == SendLedgerEntry.account_id)
            .scalar_subquery()
        )
        async with self._accounts.write_lock(), transaction(self._sessions) as session:
            # A ledger entry may go once it is out of the window and the account's running count no
            # longer includes it (its cutoff has passed it), or the count would never drop by it.
            ledger = await session.execute(
                delete(SendLedgerEntry).where(
                    SendLedgerEntry.at < now - 2 * WINDOW, SendLedgerEntry.at <= cutoff
                )
            )
            events = await session.execute(
                delete(ProcessedEvent).where(ProcessedEvent.processed_at < now - EVENT_MEMORY)
            )
            stats = await session.execute(
                delete(SendStatsSlot).where(
                    SendStatsSlot.slot_start < now - keep_stats - dt.timedelta(days=1)
                )
            )
        counts = {
            "ledger": ledger.rowcount,  # type: ignore[attr-defined]
            "events": events.rowcount,  # type: ignore[attr-defined]
            "statistics": stats.rowcount,  # type: ignore[attr-defined]
        }
        log.info("housekeeping", extra=counts)
        return counts
