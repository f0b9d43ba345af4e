"""Sending statistics and reputation, fed by the email events on NATS (domain code: no gRPC).

Events are counted per account in 15-minute intervals (what GetSendStatistics returns). The bounce
and complaint rates are computed from those intervals over the representative window, and judged
against the review and pause thresholds every REPUTATION_EVALUATION_SECONDS for the accounts whose
counts changed since (not per batch: an account sending steadily would be judged many times a second).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, cast

from google.protobuf.timestamp_pb2 import Timestamp
from nats.js import JetStreamContext
from sqlalchemy import Table, bindparam, delete, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from postmesh.common.addresses import address_key
from postmesh.common.bus import consume_event_batches
from postmesh.common.config import Settings
from postmesh.common.db import transaction
from postmesh.common.protoutil import utc_datetime
from postmesh.common.service import Clock
from postmesh.common.streams import email_event_subject
from postmesh.events.v1 import events_pb2
from services.quota.accounts import HEALTHY, PROBATION, SHUTDOWN, SYSTEM, QuotaAccounts, slot_start
from services.quota.models import AccountQuota, ProcessedEvent, ReputationPending, SendStatsSlot
from services.quota.notify import SYSTEM_ACCOUNT_ID

log = logging.getLogger(__name__)

SLOT = dt.timedelta(minutes=15)
_SLOT_SECONDS = int(SLOT.total_seconds())
HISTORY = dt.timedelta(days=14)
CONSUMER = "quota-statistics"

_COLUMN_BY_TYPE = {
    events_pb2.EMAIL_EVENT_TYPE_SEND: "delivery_attempts",
    events_pb2.EMAIL_EVENT_TYPE_BOUNCE: "bounces",
    events_pb2.EMAIL_EVENT_TYPE_COMPLAINT: "complaints",
    events_pb2.EMAIL_EVENT_TYPE_REJECT: "rejects",
}
_COLUMN_BY_HOLD_ACTION = {
    events_pb2.HOLD_ACTION_HELD: "held",
    events_pb2.HOLD_ACTION_RELEASED: "held_released",
    events_pb2.HOLD_ACTION_DROPPED: "held_dropped",
}
COLUMNS = ("delivery_attempts", "bounces", "complaints", "rejects", "held", "held_released", "held_dropped")
# What reputation is judged on: a change of any of them may change the verdict (a bounce raises the
# rate, more delivery attempts lower it or bring the account up to the minimum volume).
REPUTATION_COLUMNS = ("delivery_attempts", "bounces", "complaints")
# The email event types counted() counts, and the subjects they are published on: the consumer is
# handed no others (a Delivery or an Open would only be fetched, decoded and acked for nothing).
COUNTED_TYPES = (*_COLUMN_BY_TYPE, events_pb2.EMAIL_EVENT_TYPE_HOLD)
COUNTED_SUBJECTS = tuple(email_event_subject(t) for t in COUNTED_TYPES)

_PROCESSED = cast(Table, ProcessedEvent.__table__)
_SLOTS = cast(Table, SendStatsSlot.__table__)
_PENDING = cast(Table, ReputationPending.__table__)


def counted(event: events_pb2.Event) -> tuple[str, int] | None:
    """(statistics column, messages) for an event that counts, else None. Each recipient is one
    message, as in SES."""
    if event.WhichOneof("payload") != "email" or event.account_id in ("", SYSTEM_ACCOUNT_ID):
        return None
    email = event.email
    if email.event_type == events_pb2.EMAIL_EVENT_TYPE_HOLD:
        # Counted for the operator and the account owner; none moves the delivery attempts (a held
        # message was one when accepted; a dropped one leaves them through its Reject event).
        column = _COLUMN_BY_HOLD_ACTION.get(email.hold.action)
        return None if column is None else (column, len(email.mail.destination) or 1)
    column = _COLUMN_BY_TYPE.get(email.event_type)
    # The mailbox simulator's events count against the quota (at accept time), never reputation.
    if column is None or email.simulated:
        return None
    if email.event_type == events_pb2.EMAIL_EVENT_TYPE_BOUNCE:
        # Not hard bounces from a receiver: soft ones, and the sender's own refusals to send to a
        # suppressed address (SES does not count those against reputation either).
        if email.bounce.bounce_type == events_pb2.BOUNCE_TYPE_TRANSIENT or email.bounce.bounce_sub_type in (
            events_pb2.BOUNCE_SUB_TYPE_ON_ACCOUNT_SUPPRESSION_LIST,
            events_pb2.BOUNCE_SUB_TYPE_SUPPRESSED,
        ):
            return None
        return column, len(email.bounce.bounced_recipients) or 1
    if email.event_type == events_pb2.EMAIL_EVENT_TYPE_COMPLAINT:
        return column, len(email.complaint.complained_recipients) or 1
    if email.event_type == events_pb2.EMAIL_EVENT_TYPE_SEND:
        return _attempts(email)
    return column, len(email.mail.destination) or 1


def _attempts(send: events_pb2.EmailEvent) -> tuple[str, int] | None:
    """Delivery attempts of a Send event: its recipients less those never attempted. As in SES, a
    recipient on the suppression list is no delivery attempt (its quota was given back and its
    OnAccountSuppressionList bounce is no bounce), or sending to suppressed addresses would dilute
    the bounce rate for free; nor is a mailbox simulator address."""
    destination = send.mail.destination
    if not destination:
        return "delivery_attempts", 1
    if not send.suppressed_recipients and not send.simulated_recipients:
        return "delivery_attempts", len(destination)
    skipped = {address_key(a) for a in [*send.suppressed_recipients, *send.simulated_recipients]}
    attempts = sum(1 for a in destination if address_key(a) not in skipped)
    return ("delivery_attempts", attempts) if attempts else None


@dataclass(frozen=True)
class Reputation:
    sends: int
    bounces: int
    complaints: int

    @property
    def bounce_rate(self) -> float:
        return self.bounces / self.sends if self.sends else 0.0

    @property
    def complaint_rate(self) -> float:
        return self.complaints / self.sends if self.sends else 0.0


@dataclass(frozen=True)
class Thresholds:
    min_volume: int
    bounce_review: float
    bounce_pause: float
    complaint_review: float
    complaint_pause: float

    @classmethod
    def from_settings(cls, settings: Settings) -> Thresholds:
        return cls(
            settings.reputation_min_volume,
            settings.reputation_bounce_review_rate,
            settings.reputation_bounce_pause_rate,
            settings.reputation_complaint_review_rate,
            settings.reputation_complaint_pause_rate,
        )


def judge(reputation: Reputation, t: Thresholds) -> tuple[str, str] | None:
    """The enforcement status the rates call for, and why; None below the minimum volume."""
    if reputation.sends < t.min_volume:
        return None
    over = f"over the last {reputation.sends} messages"
    bounce = f"Bounce rate {reputation.bounce_rate:.2%} {over}"
    complaint = f"Complaint rate {reputation.complaint_rate:.2%} {over}"
    if reputation.bounce_rate >= t.bounce_pause:
        return SHUTDOWN, f"{bounce} reached the pause threshold of {t.bounce_pause:.2%}."
    if reputation.complaint_rate >= t.complaint_pause:
        return SHUTDOWN, f"{complaint} reached the pause threshold of {t.complaint_pause:.2%}."
    if reputation.bounce_rate >= t.bounce_review:
        return PROBATION, f"{bounce} reached the review threshold of {t.bounce_review:.2%}."
    if reputation.complaint_rate >= t.complaint_review:
        return PROBATION, f"{complaint} reached the review threshold of {t.complaint_review:.2%}."
    return HEALTHY, f"Bounce and complaint rates {over} are below the review thresholds."


SlotKey = tuple[str, dt.datetime]


def _slot_counts(events: Iterable[tuple[events_pb2.Event, str, int]]) -> dict[SlotKey, dict[str, int]]:
    """What counted events add to each (account, 15-minute interval)."""
    counts: dict[SlotKey, dict[str, int]] = {}
    # The events of a batch fall in an interval or two: each is converted once.
    slots: dict[int, dt.datetime] = {}

    def slot_of(ts: Timestamp) -> dt.datetime:
        # UTC intervals of 15 minutes start on whole multiples of 900 seconds since the epoch (as do
        # the bounds of a Timestamp's range). Nanos out of range raise, as they did.
        interval = ts.seconds - ts.seconds % _SLOT_SECONDS
        start = slots.get(interval)
        if start is None or not 0 <= ts.nanos < 1_000_000_000:
            start = slots[interval] = slot_start(utc_datetime(ts))
        return start

    for event, column, messages in events:
        key = (event.account_id, slot_of(event.time))
        slot = counts.get(key)
        if slot is None:
            slot = counts[key] = dict.fromkeys(COLUMNS, 0)
        slot[column] += messages
        if column == "rejects" and event.email.mail.HasField("timestamp"):
            # Counted as a delivery attempt by its Send event when accepted; SES never tried to
            # deliver a rejected message, so it leaves the attempts (and the bounce rate's
            # denominator) of the interval it was sent in.
            sent = (event.account_id, slot_of(event.email.mail.timestamp))
            counts.setdefault(sent, dict.fromkeys(COLUMNS, 0))["delivery_attempts"] -= messages
    return counts


def _upsert(dialect: str) -> Any:
    return postgresql.insert if dialect == "postgresql" else sqlite.insert


class SendStatistics:
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
        # Built once, so SQLAlchemy compiles each once (its cache) and every batch runs it as an
        # executemany (PostgreSQL and SQLite alike).
        insert = _upsert(sessions.kw["bind"].dialect.name)
        processed = insert(_PROCESSED)
        self._first_time = processed.on_conflict_do_nothing(index_elements=["event_id"]).returning(
            _PROCESSED.c.event_id
        )
        counts = insert(_SLOTS)
        self._add_counts = counts.on_conflict_do_update(
            index_elements=["account_id", "slot_start"],
            set_={c: _SLOTS.c[c] + counts.excluded[c] for c in COLUMNS},
        )
        pending = insert(_PENDING).values(version=1)
        self._mark_pending = pending.on_conflict_do_update(
            index_elements=["account_id"], set_={"version": _PENDING.c.version + 1}
        )
        self._unmark_pending = delete(_PENDING).where(
            _PENDING.c.account_id == bindparam("judged_account"),
            _PENDING.c.version == bindparam("judged_version"),
        )

    async def record(self, events: Iterable[events_pb2.Event]) -> set[str]:
        """Counts the events not counted before (by event id), in one transaction; returns the
        accounts whose counts changed, and marks those whose reputation counts changed for the next
        judge's round in the same transaction. Three statements per batch whatever its size, each
        an executemany of one cached statement: on SQLite the batch holds the one write lock that
        quota reservations wait for."""
        wanted: dict[str, tuple[events_pb2.Event, str, int]] = {}
        for event in events:
            what = counted(event)
            if what is not None and event.event_id:
                wanted[event.event_id] = (event, *what)
        if not wanted:
            return set()
        now = self._clock.now()
        async with self._accounts.write_lock(), transaction(self._sessions) as session:
            # A redelivered or republished event inserts nothing: it was counted already. Rows go in
            # key order, so that two replicas writing the same rows on PostgreSQL cannot deadlock.
            first_time = (
                await session.scalars(
                    self._first_time, [{"event_id": i, "processed_at": now} for i in sorted(wanted)]
                )
            ).all()
            counts = _slot_counts(wanted[event_id] for event_id in first_time)
            if counts:
                rows = [{"account_id": a, "slot_start": s, **c} for (a, s), c in sorted(counts.items())]
                await session.execute(self._add_counts, rows)
            to_judge = sorted({a for (a, _), c in counts.items() if any(c[k] for k in REPUTATION_COLUMNS)})
            if to_judge:
                await session.execute(self._mark_pending, [{"account_id": a} for a in to_judge])
        return {account_id for account_id, _ in counts}

    async def data_points(self, account_id: str) -> Sequence[SendStatsSlot]:
        since = slot_start(self._clock.now() - HISTORY)
        async with self._sessions() as session:
            rows = await session.scalars(
                select(SendStatsSlot)
                .where(SendStatsSlot.account_id == account_id, SendStatsSlot.slot_start >= since)
                .order_by(SendStatsSlot.slot_start)
            )
            return rows.all()

    async def reputation(self, account: AccountQuota) -> Reputation:
        """Rates over the representative window: the last REPUTATION_WINDOW_DAYS, or fewer when the
        last REPUTATION_WINDOW_MESSAGES are covered sooner, and never before reputation_since (a
        reinstatement: what its 15-minute interval held then is left out)."""
        since = slot_start(self._clock.now() - dt.timedelta(days=self._settings.reputation_window_days))
        base: tuple[int, int, int] | None = None
        reset = account.reputation_since
        if reset is not None and slot_start(reset) >= since:
            since = slot_start(reset)
            base = (
                account.reputation_base_sends,
                account.reputation_base_bounces,
                account.reputation_base_complaints,
            )
        async with self._sessions() as session:
            rows = await session.execute(
                select(
                    SendStatsSlot.slot_start,
                    SendStatsSlot.delivery_attempts,
                    SendStatsSlot.bounces,
                    SendStatsSlot.complaints,
                )
                .where(SendStatsSlot.account_id == account.account_id, SendStatsSlot.slot_start >= since)
                .order_by(SendStatsSlot.slot_start.desc())
            )
            enough = self._settings.reputation_window_messages
            sends = bounces = complaints = 0
            for start, slot_sends, slot_bounces, slot_complaints in rows:
                if base is not None and start == since:
                    slot_sends -= base[0]
                    slot_bounces -= base[1]
                    slot_complaints -= base[2]
                sends += slot_sends
                bounces += slot_bounces
                complaints += slot_complaints
                if enough > 0 and sends >= enough:
                    break
        return Reputation(max(sends, 0), max(bounces, 0), max(complaints, 0))

    async def evaluate(self, account_id: str) -> None:
        """Moves the account to the status its rates call for. PROBATION recovers to HEALTHY on its
        own; a pause (SHUTDOWN) ends only when an operator reinstates the account."""
        async with self._sessions() as session:
            account = await session.get(AccountQuota, account_id)
        if account is None or account.enforcement_status == SHUTDOWN:
            return  # unknown to this quota service (it never reserved), or paused already
        verdict = judge(await self.reputation(account), Thresholds.from_settings(self._settings))
        if verdict is None or verdict[0] == account.enforcement_status:
            return
        status, reason = verdict
        await self._accounts.change_enforcement(
            account_id, status, reason, SYSTEM, only_from=account.enforcement_status
        )
        log.info("enforcement status changed", extra={"account_id": account_id, "status": status})

    async def evaluate_pending(self) -> int:
        """Judges every account marked by record() and unmarks it; returns how many were judged. An
        account marked again meanwhile (its version moved) stays for the next round, as does one
        whose judgement failed."""
        async with self._sessions() as session:
            pending = (await session.execute(select(_PENDING.c.account_id, _PENDING.c.version))).all()
        judged = []
        for account_id, version in sorted(pending):
            try:
                await self.evaluate(account_id)
            except Exception:
                log.exception(
                    "reputation not judged; tried again next round", extra={"account_id": account_id}
                )
                continue
            judged.append({"judged_account": account_id, "judged_version": version})
        if judged:
            async with self._accounts.write_lock(), transaction(self._sessions) as session:
                await session.execute(self._unmark_pending, judged)
        return len(judged)


class EventConsumer:
    """A durable pull consumer on the events stream, filtered to the email events that count: shared
    by every quota replica, each event taken by one. Unlike postmesh.common.bus.consume_events (one
    event at a time) it counts a whole batch in one transaction, which keeps up with thousands of
    events a second. Acked only after the counts are committed; counting is idempotent by event id,
    so a redelivery counts nothing twice. Reputation is left to the ReputationJudge."""

    def __init__(self, js: JetStreamContext, statistics: SendStatistics, *, batch: int = 256) -> None:
        self._js = js
        self._statistics = statistics
        self._batch = batch

    async def run(self) -> None:
        # A durable made with another filter (all email events, before) is updated in place by the
        # server (2.10 and later), keeping its position in the stream.
        await consume_event_batches(
            self._js,
            durable=CONSUMER,
            subjects=COUNTED_SUBJECTS,
            handle=self._process,
            batch=self._batch,
        )

    async def _process(self, events: list[events_pb2.Event]) -> None:
        await self._statistics.record(events)


class ReputationJudge:
    """Judges the accounts whose counts changed, every `interval_seconds` (first at once: what a
    stopped process had counted but not judged is judged on start)."""

    def __init__(self, statistics: SendStatistics, interval_seconds: float) -> None:
        self._statistics = statistics
        self._interval = max(interval_seconds, 0.01)  # 0 would spin, judging nothing new

    async def run(self) -> None:
        while True:
            await self.run_once()
            await asyncio.sleep(self._interval)

    async def run_once(self) -> int:
        return await self._statistics.evaluate_pending()
