"""Each account's sending state and quota, and the reservations that enforce it (domain code: no gRPC).

The quota service is the single authority on quota. Per account it keeps, in the database:
- a token bucket for the send rate (level and the time of that level; refilled lazily), whose
  capacity is one second of rate;
- the rolling 24-hour count, kept incrementally (window_sent counts the ledger entries newer than
  window_cutoff; advancing the cutoff subtracts the entries that fell out), so a reservation does not
  sum a day of ledger;
- a ledger entry per reservation, which is what a release gives back to.
Every reservation and release of an account starts with an UPDATE of its row, which serializes them
in the database (a row lock on PostgreSQL, the write lock on SQLite) across quota-service replicas.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import math
import weakref
from collections.abc import AsyncIterator, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager, nullcontext
from dataclasses import dataclass

from sqlalchemy import func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from postmesh.common.config import Settings
from postmesh.common.db import transaction
from postmesh.common.errors import FailedPrecondition, InvalidArgument, NotFound, ResourceExhausted
from postmesh.common.paging import decode_token, encode_token, keyset_page, split_page
from postmesh.common.paging import page_size as size_of
from postmesh.common.service import Clock
from services.quota.models import AccountChangeRecord, AccountQuota, SendLedgerEntry, SendStatsSlot
from services.quota.notify import Notifier, sending_state_title

WINDOW = dt.timedelta(hours=24)

HEALTHY, PROBATION, SHUTDOWN = "HEALTHY", "PROBATION", "SHUTDOWN"
SYSTEM, OPERATOR, ACCOUNT = "system", "operator", "account"

RATE_EXCEEDED = "Maximum sending rate exceeded."
DAILY_EXCEEDED = "Daily message quota exceeded."
SENDING_PAUSED = "Email sending is paused for this account."


@dataclass(frozen=True)
class AccountState:
    quota: AccountQuota
    sent_last_24_hours: int


@dataclass(frozen=True)
class Grant:
    reservation_id: str
    granted: int
    production_access: bool
    lease_seconds: float


def bucket_capacity(rate: float) -> float:
    # One second of rate; at least one message so that a rate below 1/s can still send.
    return max(rate, 1.0)


def slot_start(at: dt.datetime) -> dt.datetime:
    """The start of the 15-minute statistics interval `at` falls in."""
    at = at.astimezone(dt.UTC)
    return at.replace(minute=at.minute - at.minute % 15, second=0, microsecond=0)


def require_account_id(account_id: str) -> str:
    if not account_id or len(account_id) > 32:
        raise InvalidArgument("account_id is required (at most 32 characters).", field="account_id")
    return account_id


class QuotaAccounts:
    def __init__(
        self,
        sessions: async_sessionmaker[AsyncSession],
        clock: Clock,
        settings: Settings,
        notifier: Notifier,
    ) -> None:
        self._sessions = sessions
        self._clock = clock
        self._settings = settings
        self._notifier = notifier
        # SQLite has one writer: this process's writers queue here rather than in SQLite's busy loop.
        # PostgreSQL locks rows, so only writers of the same account need to queue.
        self._single_writer = sessions.kw["bind"].dialect.name == "sqlite"
        self._locks: weakref.WeakValueDictionary[str, asyncio.Lock] = weakref.WeakValueDictionary()

    # --- Locking and rows.

    def _lock_for(self, account_id: str) -> asyncio.Lock:
        key = "" if self._single_writer else account_id
        lock = self._locks.get(key)
        if lock is None:
            lock = asyncio.Lock()
            self._locks[key] = lock
        return lock

    def write_lock(self) -> AbstractAsyncContextManager[object]:
        """For writers that are not about one account's row (statistics): queue with the others on
        SQLite; PostgreSQL needs nothing more than its own row locks."""
        return self._lock_for("") if self._single_writer else nullcontext()

    def _new_row(self, account_id: str) -> AccountQuota:
        now = self._clock.now()
        rate = self._settings.sandbox_max_send_rate
        return AccountQuota(
            account_id=account_id,
            production_access=False,
            sending_enabled=True,
            enforcement_status=HEALTHY,
            max_24_hour_send=self._settings.sandbox_max_24_hour_send,
            max_send_rate=rate,
            created_at=now,
            tokens=bucket_capacity(rate),
            tokens_at=now,
            window_sent=0,
            window_cutoff=now - WINDOW,
            enforcement_reason="",
            reputation_since=now,
            reputation_base_sends=0,
            reputation_base_bounces=0,
            reputation_base_complaints=0,
            quota_changed_at=now,
            mail_type="",
            website_url="",
            contact_language="",
            use_case_description="",
            contact_addresses="",
            expected_daily_volume=0,
            review_case_id="",
        )

    async def _ensure_row(self, account_id: str) -> None:
        async with self._sessions() as session:
            if await session.get(AccountQuota, account_id) is not None:
                return
        try:
            async with transaction(self._sessions) as session:
                session.add(self._new_row(account_id))
        except IntegrityError:
            pass  # another replica created it first

    @asynccontextmanager
    async def locked(self, account_id: str) -> AsyncIterator[tuple[AsyncSession, AccountQuota]]:
        """A transaction holding the account's row lock, with the row (created if new)."""
        await self._ensure_row(account_id)
        async with self._lock_for(account_id), transaction(self._sessions) as session:
            # A write first: PostgreSQL locks the row, SQLite takes its write lock, before anything is read.
            await session.execute(
                update(AccountQuota)
                .where(AccountQuota.account_id == account_id)
                .values(tokens=AccountQuota.tokens)
            )
            row = await session.get(AccountQuota, account_id, populate_existing=True)
            assert row is not None
            yield session, row

    # --- The rolling window and the bucket, advanced to `now` (under the lock).

    async def _advance(self, session: AsyncSession, row: AccountQuota, now: dt.datetime) -> None:
        new_cutoff = now - WINDOW
        cutoff = row.window_cutoff
        if cutoff is None:
            row.window_sent = await self._ledger_sum(session, row.account_id, new_cutoff, None)
            row.window_cutoff = new_cutoff
        elif new_cutoff > cutoff:
            row.window_sent -= await self._ledger_sum(session, row.account_id, cutoff, new_cutoff)
            row.window_cutoff = new_cutoff
        capacity = bucket_capacity(row.max_send_rate)
        if row.tokens_at is None:
            row.tokens = capacity
        elif now > row.tokens_at:
            elapsed = (now - row.tokens_at).total_seconds()
            row.tokens = min(capacity, row.tokens + row.max_send_rate * elapsed)
        row.tokens_at = max(now, row.tokens_at or now)

    @staticmethod
    async def _ledger_sum(
        session: AsyncSession, account_id: str, after: dt.datetime, until: dt.datetime | None
    ) -> int:
        statement = select(func.coalesce(func.sum(SendLedgerEntry.messages), 0)).where(
            SendLedgerEntry.account_id == account_id, SendLedgerEntry.at > after
        )
        if until is not None:
            statement = statement.where(SendLedgerEntry.at <= until)
        return int(await session.scalar(statement) or 0)

    async def _daily_retry_after(
        self, session: AsyncSession, row: AccountQuota, messages: int, now: dt.datetime
    ) -> float | None:
        """Seconds until enough of the window has rolled off for `messages` more; None if never."""
        if messages > row.max_24_hour_send:
            return None
        excess = row.window_sent + messages - row.max_24_hour_send
        freed = 0
        entries = await session.execute(
            select(SendLedgerEntry.at, SendLedgerEntry.messages)
            .where(SendLedgerEntry.account_id == row.account_id, SendLedgerEntry.at > row.window_cutoff)
            .order_by(SendLedgerEntry.at)
        )
        for at, count in entries:
            freed += count
            if freed >= excess:
                return max((at + WINDOW - now).total_seconds(), 0.001)
        return None

    # --- Reservations.

    async def reserve(self, account_id: str, messages: int, lease_messages: int = 0) -> Grant:
        require_account_id(account_id)
        if messages <= 0:
            raise InvalidArgument("messages must be at least 1 (one per recipient).", field="messages")
        if lease_messages < 0:
            raise InvalidArgument("lease_messages must not be negative.", field="lease_messages")
        async with self.locked(account_id) as (session, row):
            if not row.sending_enabled:
                raise FailedPrecondition(SENDING_PAUSED, reason="ACCOUNT_SENDING_PAUSED")
            now = self._clock.now()
            await self._advance(session, row, now)
            if row.window_sent + messages > row.max_24_hour_send:
                raise ResourceExhausted(
                    DAILY_EXCEEDED,
                    reason="DAILY_QUOTA_EXCEEDED",
                    metadata={"max_24_hour_send": f"{row.max_24_hour_send:g}"},
                    retry_after_seconds=await self._daily_retry_after(session, row, messages, now),
                )
            capacity = bucket_capacity(row.max_send_rate)
            # A message with more recipients than the bucket holds goes when the bucket is full, and
            # leaves it in debt, so that the average rate still holds.
            needed = min(float(messages), capacity)
            if row.tokens + 1e-9 < needed:
                raise ResourceExhausted(
                    RATE_EXCEEDED,
                    reason="MAX_SEND_RATE_EXCEEDED",
                    metadata={"max_send_rate": f"{row.max_send_rate:g}"},
                    retry_after_seconds=max((needed - row.tokens) / row.max_send_rate, 0.001),
                )
            lease_cap = math.floor(row.max_send_rate * self._settings.quota_lease_seconds)
            extra = max(
                0,
                min(
                    lease_messages,
                    lease_cap,
                    math.floor(row.tokens + 1e-9) - messages,
                    math.floor(row.max_24_hour_send) - row.window_sent - messages,
                ),
            )
            granted = messages + extra
            row.tokens -= granted
            row.window_sent += granted
            # Never at or before the cutoff, or the entry would never roll off the count.
            at = now if row.window_cutoff is None or now > row.window_cutoff else row.window_cutoff
            entry = SendLedgerEntry(account_id=account_id, messages=granted, at=at)
            session.add(entry)
            await session.flush()
            lease_seconds = self._settings.quota_lease_seconds if extra else 0.0
            return Grant(str(entry.id), granted, row.production_access, lease_seconds)

    async def release(self, account_id: str, reservation_id: str, messages: int) -> None:
        require_account_id(account_id)
        if messages <= 0:
            raise InvalidArgument("messages must be at least 1.", field="messages")
        try:
            entry_id = int(reservation_id)
        except ValueError:
            raise InvalidArgument(
                "reservation_id is not one this service issued.", field="reservation_id"
            ) from None
        async with self.locked(account_id) as (session, row):
            entry = await session.get(SendLedgerEntry, entry_id)
            if entry is None or entry.account_id != account_id:
                raise NotFound(
                    f"Reservation {reservation_id} does not exist.", reason="RESERVATION_NOT_FOUND"
                )
            given_back = min(messages, entry.messages)
            if given_back == 0:
                return
            now = self._clock.now()
            await self._advance(session, row, now)
            entry.messages -= given_back
            if row.window_cutoff is None or entry.at > row.window_cutoff:
                row.window_sent -= given_back
            # Unused tokens go back into the bucket, never above its capacity: the bucket then holds
            # what it would have held had they never been taken, or less.
            row.tokens = min(bucket_capacity(row.max_send_rate), row.tokens + given_back)

    # --- Reading the state.

    async def state(self, account_id: str) -> AccountState:
        await self._ensure_row(account_id)
        async with self._sessions() as session:
            row = await session.get(AccountQuota, account_id)
            assert row is not None
            return AccountState(row, await self._sent_last_24_hours(session, row))

    async def _sent_last_24_hours(self, session: AsyncSession, row: AccountQuota) -> int:
        """The rolling count as of now, without advancing (and so without locking) the row."""
        cutoff = self._clock.now() - WINDOW
        if row.window_cutoff is None:
            return await self._ledger_sum(session, row.account_id, cutoff, None)
        if cutoff <= row.window_cutoff:
            return row.window_sent
        return row.window_sent - await self._ledger_sum(session, row.account_id, row.window_cutoff, cutoff)

    async def list_states(self, page_size: int, page_token: str) -> tuple[list[AccountState], str]:
        statement, size = keyset_page(select(AccountQuota), AccountQuota.account_id, page_size, page_token)
        async with self._sessions() as session:
            rows = (await session.scalars(statement)).all()
            page, token = split_page(rows, size, lambda r: r.account_id)
            return [AccountState(r, await self._sent_last_24_hours(session, r)) for r in page], token

    async def changes(
        self, account_id: str, page_size: int, page_token: str
    ) -> tuple[Sequence[AccountChangeRecord], str]:
        """Newest first: the page token is the id to continue below."""
        size = size_of(page_size)
        statement = select(AccountChangeRecord).where(AccountChangeRecord.account_id == account_id)
        if page_token:
            statement = statement.where(AccountChangeRecord.id < int(decode_token(page_token)))
        statement = statement.order_by(AccountChangeRecord.id.desc()).limit(size + 1)
        async with self._sessions() as session:
            rows = (await session.scalars(statement)).all()
        if len(rows) > size:
            return rows[:size], encode_token(rows[size - 1].id)
        return rows, ""

    # --- Changes of state, each recorded with its reason and announced.

    @staticmethod
    async def _reset_reputation(session: AsyncSession, row: AccountQuota, now: dt.datetime) -> None:
        """Reputation is judged afresh from `now`: what its 15-minute interval holds so far is left out."""
        current = await session.get(SendStatsSlot, (row.account_id, slot_start(now)))
        row.reputation_since = now
        row.reputation_base_sends = current.delivery_attempts if current else 0
        row.reputation_base_bounces = current.bounces if current else 0
        row.reputation_base_complaints = current.complaints if current else 0

    def record(self, session: AsyncSession, row: AccountQuota, kind: str, reason: str, actor: str) -> None:
        session.add(
            AccountChangeRecord(
                account_id=row.account_id,
                at=self._clock.now(),
                kind=kind,
                reason=reason,
                actor=actor,
                production_access=row.production_access,
                sending_enabled=row.sending_enabled,
                enforcement_status=row.enforcement_status,
                max_24_hour_send=row.max_24_hour_send,
                max_send_rate=row.max_send_rate,
            )
        )

    async def set_quota(
        self,
        account_id: str,
        max_24_hour_send: float,
        max_send_rate: float,
        reason: str,
        actor: str,
        *,
        expected: tuple[float, float] | None = None,
    ) -> AccountState:
        """Sets the 24-hour quota and rate. With `expected` (24-hour quota, rate), refuses with
        QUOTA_CHANGED if the quota is no longer that (another replica changed it meanwhile)."""
        require_account_id(account_id)
        if not max_24_hour_send > 0:
            raise InvalidArgument("max_24_hour_send must be positive.", field="max_24_hour_send")
        if not max_send_rate > 0:
            raise InvalidArgument("max_send_rate must be positive.", field="max_send_rate")
        async with self.locked(account_id) as (session, row):
            if expected is not None and expected != (row.max_24_hour_send, row.max_send_rate):
                raise FailedPrecondition("The quota changed meanwhile.", reason="QUOTA_CHANGED")
            await self._advance(session, row, self._clock.now())
            row.max_24_hour_send = max_24_hour_send
            row.max_send_rate = max_send_rate
            row.tokens = min(row.tokens, bucket_capacity(max_send_rate))
            row.quota_changed_at = self._clock.now()
            self.record(session, row, "QUOTA", reason, actor)
            state = AccountState(row, row.window_sent)
        await self._notifier.account_changed(state.quota, reason, title="sending quota changed")
        return state

    async def set_sending_enabled(self, account_id: str, enabled: bool) -> AccountState:
        """The account pauses or resumes its own sending; a pause by enforcement stays as it is."""
        require_account_id(account_id)
        reason = "Sending resumed by the account." if enabled else "Sending paused by the account."
        async with self.locked(account_id) as (session, row):
            row.paused_by_account = not enabled
            row.sending_enabled = enabled and row.enforcement_status != SHUTDOWN
            self.record(session, row, "SENDING", reason, ACCOUNT)
            state = AccountState(row, row.window_sent)
        await self._notifier.account_changed(
            state.quota, reason, title="sending resumed" if enabled else "sending paused by the account"
        )
        return state

    async def set_enforcement(
        self, account_id: str, status: str, reason: str, actor: str, *, reset_reputation: bool = False
    ) -> AccountState:
        """Moves an account to HEALTHY, PROBATION or SHUTDOWN (SHUTDOWN pauses sending)."""
        state = await self.change_enforcement(
            account_id, status, reason, actor, reset_reputation=reset_reputation
        )
        assert state is not None  # unconditional without only_from
        return state

    async def change_enforcement(
        self,
        account_id: str,
        status: str,
        reason: str,
        actor: str,
        *,
        reset_reputation: bool = False,
        only_from: str | None = None,
    ) -> AccountState | None:
        """As set_enforcement; with `only_from`, nothing happens (None) unless the account is still
        in that status (another replica may have judged it meanwhile)."""
        require_account_id(account_id)
        async with self.locked(account_id) as (session, row):
            if only_from is not None and row.enforcement_status != only_from:
                return None
            now = self._clock.now()
            await self._advance(session, row, now)
            row.enforcement_status = status
            row.sending_enabled = status != SHUTDOWN and not row.paused_by_account
            row.enforcement_reason = "" if status == HEALTHY else reason
            if reset_reputation:
                await self._reset_reputation(session, row, now)
            self.record(session, row, "ENFORCEMENT", reason, actor)
            state = AccountState(row, row.window_sent)
        await self._notifier.account_changed(state.quota, reason, title=sending_state_title(state.quota))
        return state
