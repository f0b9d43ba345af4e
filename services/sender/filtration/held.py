"""Messages held by the spam policy, kept in the sender's tables until an operator releases them
(back on the work queue, not scored again) or drops them (a Reject event); and the accounts' own
spam policies. Domain code: no gRPC."""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Sequence

from nats.js import JetStreamContext
from prometheus_client import Counter
from sqlalchemy import delete, func, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from postmesh.common.bus import EventPublisher, new_event
from postmesh.common.db import transaction
from postmesh.common.errors import InvalidArgument, NotFound
from postmesh.common.outbound import enqueue
from postmesh.common.paging import keyset_page, split_page
from postmesh.common.service import Clock
from postmesh.events.v1 import events_pb2 as ev
from postmesh.sender.v1 import queue_pb2
from services.sender.delivery import mail_object, reject_event
from services.sender.filtration.policy import DefaultPolicy, SpamPolicy
from services.sender.filtration.settings import SPAM_POLICIES
from services.sender.filtration.stage import SPAM
from services.sender.models import HeldMessage, SpamPolicyOverride

HELD_OUTCOMES = Counter(
    "postmesh_filtration_held_outcomes_total",
    "Held messages an operator released or dropped",
    ["outcome"],
)


def hold_event(
    queued: queue_pb2.QueuedMessage, action: ev.HoldAction.ValueType, details: str, now: dt.datetime
) -> ev.Event:
    """A Hold event (postmesh's own type): the statistics count held, released and dropped messages
    from these, and the account owner sees in the message's timeline why it waits."""
    email = ev.EmailEvent(event_type=ev.EMAIL_EVENT_TYPE_HOLD, hold=ev.Hold(action=action, details=details))
    email.mail.CopyFrom(mail_object(queued))
    email.filtration.CopyFrom(queued.filtration)
    event = new_event(queued.account_id, time=now, email=email)
    # Each happens once per message: a redelivered hold, or a release or drop retried after a crash,
    # publishes the same event id, which JetStream and the statistics count once.
    name = ev.HoldAction.Name(action)
    event.event_id = uuid.uuid5(uuid.NAMESPACE_URL, f"postmesh:hold:{name}:{queued.message_id}").hex
    return event


class HeldStore:
    def __init__(
        self,
        *,
        sessions: async_sessionmaker[AsyncSession],
        js: JetStreamContext,
        events: EventPublisher,
        clock: Clock,
    ) -> None:
        self._sessions = sessions
        self._js = js
        self._events = events
        self._clock = clock
        dialect = sessions.kw["bind"].dialect.name
        self._insert = postgresql.insert if dialect == "postgresql" else sqlite.insert

    async def hold(self, queued: queue_pb2.QueuedMessage, mime: bytes, details: str) -> None:
        """Keeps the message (body inline, so the object store may forget it). A redelivered
        message held twice is kept once."""
        kept = queue_pb2.QueuedMessage()
        kept.CopyFrom(queued)
        kept.mime = mime
        kept.mime_object = ""
        async with transaction(self._sessions) as session:
            await session.execute(
                self._insert(HeldMessage)
                .values(
                    message_id=queued.message_id,
                    account_id=queued.account_id,
                    from_address=queued.from_address,
                    subject=queued.subject,
                    spam_score=queued.filtration.spam_score,
                    details=details,
                    size_bytes=len(mime),
                    queued=kept.SerializeToString(),
                    held_at=self._clock.now(),
                )
                .on_conflict_do_nothing(index_elements=["message_id"])
            )
        await self._events.publish(hold_event(queued, ev.HOLD_ACTION_HELD, details, self._clock.now()))

    async def list(
        self, account_id: str, page_size: int, page_token: str
    ) -> tuple[Sequence[HeldMessage], str]:
        query = select(HeldMessage)
        if account_id:
            query = query.where(HeldMessage.account_id == account_id)
        statement, size = keyset_page(query, HeldMessage.message_id, page_size, page_token)
        async with self._sessions() as session:
            rows = (await session.scalars(statement)).all()
        return split_page(rows, size, lambda m: m.message_id)

    async def get(self, message_id: str) -> HeldMessage:
        async with self._sessions() as session:
            row = await session.get(HeldMessage, message_id)
        if row is None:
            raise NotFound(f"No held message {message_id!r}.", reason="HELD_MESSAGE_NOT_FOUND")
        return row

    async def count(self) -> int:
        async with self._sessions() as session:
            return int(await session.scalar(select(func.count()).select_from(HeldMessage)) or 0)

    async def release(self, message_id: str) -> None:
        """Back on the work queue, as scored (so not held again), then forgotten here: a crash in
        between queues it twice at worst, and JetStream's de-duplication drops the second copy."""
        row = await self.get(message_id)
        queued = queue_pb2.QueuedMessage.FromString(row.queued)
        queued.released = True
        queued.ClearField("not_before")
        await enqueue(self._js, queued)
        await self._events.publish(
            hold_event(queued, ev.HOLD_ACTION_RELEASED, row.details, self._clock.now())
        )
        HELD_OUTCOMES.labels("released").inc()
        await self._forget(message_id)

    async def drop(self, message_id: str) -> None:
        """Never sent: a Reject event ("Bad content") for every recipient, then forgotten."""
        row = await self.get(message_id)
        queued = queue_pb2.QueuedMessage.FromString(row.queued)
        details = f"{row.details}; dropped by an operator"
        await self._events.publish(
            reject_event(queued, list(queued.recipients), SPAM, details, self._clock.now())
        )
        await self._events.publish(hold_event(queued, ev.HOLD_ACTION_DROPPED, details, self._clock.now()))
        HELD_OUTCOMES.labels("dropped").inc()
        await self._forget(message_id)

    async def _forget(self, message_id: str) -> None:
        async with transaction(self._sessions) as session:
            await session.execute(delete(HeldMessage).where(HeldMessage.message_id == message_id))


class StoredPolicies:
    """Each account's own spam policy, else the operator's default. The configuration-set branch
    adds per-set policies here: `spam_policy` is given the set named on the message."""

    def __init__(
        self, sessions: async_sessionmaker[AsyncSession], default: DefaultPolicy, clock: Clock
    ) -> None:
        self._sessions = sessions
        self.default = default.policy
        self._clock = clock

    async def spam_policy(self, account_id: str, configuration_set: str) -> SpamPolicy:
        own = await self.account_policy(account_id)
        return own if own is not None else self.default

    async def account_policy(self, account_id: str) -> SpamPolicy | None:
        async with self._sessions() as session:
            row = await session.get(SpamPolicyOverride, account_id)
        return None if row is None else SpamPolicy(row.mode, row.threshold)

    async def put(self, account_id: str, mode: str, threshold: float) -> None:
        """mode "" (or "default") forgets the account's own policy; threshold 0: the default's."""
        if not account_id:
            raise InvalidArgument("account_id is required.", field="account_id")
        if threshold < 0 or threshold != threshold or threshold in (float("inf"), float("-inf")):
            raise InvalidArgument("threshold must be a finite, non-negative score.", field="policy.threshold")
        async with transaction(self._sessions) as session:
            await session.execute(
                delete(SpamPolicyOverride).where(SpamPolicyOverride.account_id == account_id)
            )
            if mode in ("", "default"):
                return
            if mode not in SPAM_POLICIES:
                raise InvalidArgument(
                    f"Unknown spam policy {mode!r}: choose one of {', '.join(SPAM_POLICIES)}.",
                    field="policy.mode",
                )
            session.add(
                SpamPolicyOverride(
                    account_id=account_id,
                    mode=mode,
                    threshold=threshold or self.default.threshold,
                    updated_at=self._clock.now(),
                )
            )
