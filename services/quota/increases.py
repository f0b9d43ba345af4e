"""Automatic quota increases: a production account with a healthy reputation that keeps using most of
its 24-hour quota gets it doubled (rate too), up to the configured ceilings (domain code: no gRPC)."""

from __future__ import annotations

import asyncio
import datetime as dt
import logging

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from postmesh.common.config import Settings
from postmesh.common.errors import FailedPrecondition
from postmesh.common.service import Clock
from services.quota.accounts import HEALTHY, SYSTEM, QuotaAccounts
from services.quota.models import AccountQuota
from services.quota.statistics import SendStatistics, Thresholds, judge

log = logging.getLogger(__name__)


class QuotaIncreases:
    def __init__(
        self,
        sessions: async_sessionmaker[AsyncSession],
        clock: Clock,
        settings: Settings,
        accounts: QuotaAccounts,
        statistics: SendStatistics,
    ) -> None:
        self._sessions = sessions
        self._clock = clock
        self._settings = settings
        self._accounts = accounts
        self._statistics = statistics

    async def run(self) -> None:
        """The schedule (one pass per QUOTA_AUTO_INCREASE_INTERVAL_SECONDS)."""
        interval = self._settings.quota_auto_increase_interval_seconds
        while interval > 0:
            await asyncio.sleep(interval)
            raised = await self.run_once()
            if raised:
                log.info("quotas raised automatically", extra={"accounts": ",".join(raised)})

    async def run_once(self) -> list[str]:
        """Raises every account that qualifies now; returns their ids."""
        s = self._settings
        min_age = dt.timedelta(seconds=s.quota_auto_increase_min_age_seconds)
        async with self._sessions() as session:
            candidates = (
                await session.scalars(
                    select(AccountQuota.account_id).where(
                        AccountQuota.production_access.is_(True),
                        AccountQuota.sending_enabled.is_(True),
                        AccountQuota.enforcement_status == HEALTHY,
                    )
                )
            ).all()
        raised = []
        for account_id in candidates:
            state = await self._accounts.state(account_id)
            row = state.quota
            now = self._clock.now()
            if row.quota_changed_at is not None and now - row.quota_changed_at < min_age:
                continue  # the current quota has not been in use long enough
            if state.sent_last_24_hours < s.quota_auto_increase_usage * row.max_24_hour_send:
                continue
            verdict = judge(await self._statistics.reputation(row), Thresholds.from_settings(s))
            if verdict is None or verdict[0] != HEALTHY:
                continue  # not enough volume to judge, or rates not healthy
            new_daily = min(row.max_24_hour_send * 2, s.quota_auto_increase_max_24_hour_send)
            new_rate = min(row.max_send_rate * 2, s.quota_auto_increase_max_send_rate)
            if new_daily <= row.max_24_hour_send and new_rate <= row.max_send_rate:
                continue  # at the ceiling
            reason = (
                f"Automatic increase: {state.sent_last_24_hours} of {row.max_24_hour_send:g} messages "
                "used in the last 24 hours with a healthy reputation."
            )
            try:
                await self._accounts.set_quota(
                    account_id,
                    max(new_daily, row.max_24_hour_send),
                    max(new_rate, row.max_send_rate),
                    reason,
                    SYSTEM,
                    expected=(row.max_24_hour_send, row.max_send_rate),
                )
            except FailedPrecondition:
                continue  # changed by an operator or another replica since it was read
            raised.append(account_id)
        return raised
