"""The events store (domain code and storage: no gRPC here).

Every email event of every account is kept for EVENT_RETENTION_DAYS, keyed by its event id so a
redelivered event is stored once, with the recipients it is about for filtering. Reads are always
scoped to one account.
"""

from __future__ import annotations

import datetime as dt
import functools
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import cast

from sqlalchemy import Table, and_, delete, insert, or_, select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from postmesh.common.addresses import address_key, normalize_address
from postmesh.common.db import insert_ignoring_duplicates, transaction
from postmesh.common.errors import InvalidArgument, NotFound
from postmesh.common.paging import decode_token, encode_token, page_size
from postmesh.common.protoutil import utc_datetime
from postmesh.common.service import Clock
from postmesh.events.v1 import events_pb2 as ev
from services.feedback.timeline.models import EmailEventRecipient, StoredEmailEvent

MAX_MESSAGE_EVENTS = 10_000
_TYPE_PREFIX = "EMAIL_EVENT_TYPE_"


def type_name(value: ev.EmailEventType.ValueType) -> str:
    name = _TYPE_NAMES.get(value)
    return ev.EmailEventType.Name(value).removeprefix(_TYPE_PREFIX) if name is None else name


_TYPE_NAMES = {
    value: ev.EmailEventType.Name(value).removeprefix(_TYPE_PREFIX) for value in ev.EmailEventType.values()
}


def recipients_of(email: ev.EmailEvent) -> list[str]:
    """The recipients an event is about: those it names itself, else the whole message's."""
    kind = email.event_type
    if kind == ev.EMAIL_EVENT_TYPE_DELIVERY:
        named = list(email.delivery.recipients)
    elif kind == ev.EMAIL_EVENT_TYPE_BOUNCE:
        named = [r.email_address for r in email.bounce.bounced_recipients]
    elif kind == ev.EMAIL_EVENT_TYPE_COMPLAINT:
        named = [r.email_address for r in email.complaint.complained_recipients]
    elif kind == ev.EMAIL_EVENT_TYPE_DELIVERY_DELAY:
        named = [r.email_address for r in email.delivery_delay.delayed_recipients]
    else:
        named = []
    return list(dict.fromkeys(_key(a) for a in (named or email.mail.destination) if a))


# An event names the addresses its message's earlier events named (Send, then Delivery, Open...).
@functools.lru_cache(maxsize=4096)
def _key(address: str) -> str:
    try:
        return address_key(normalize_address(address))
    except InvalidArgument:  # kept as it came, so it can still be found by what it says
        return address_key(address)


def storable(event: ev.Event) -> bool:
    return event.WhichOneof("payload") == "email" and bool(event.account_id) and bool(event.event_id)


@dataclass(frozen=True)
class EventFilter:
    event_types: Sequence[ev.EmailEventType.ValueType] = ()
    recipient: str = ""
    start: dt.datetime | None = None
    end: dt.datetime | None = None
    message_id: str = ""


@dataclass
class MessageTimeline:
    message_id: str
    events: list[ev.Event] = field(default_factory=list)

    @property
    def mail(self) -> ev.Mail:
        """The richest mail object among the events (the Send event's has every recipient)."""
        best = ev.Mail()
        for event in self.events:
            if len(event.email.mail.destination) >= len(best.destination) and event.email.mail.message_id:
                best = event.email.mail
        return best


class EventStore:
    def __init__(self, sessions: async_sessionmaker[AsyncSession], clock: Clock) -> None:
        self._sessions = sessions
        self._clock = clock
        events = cast(Table, StoredEmailEvent.__table__)
        self._add_events = insert_ignoring_duplicates(sessions, events, ["event_id"]).returning(
            events.c.id, events.c.event_id
        )
        self._add_recipients = insert(cast(Table, EmailEventRecipient.__table__))

    async def record(self, events: Iterable[ev.Event]) -> int:
        """Stores the events not stored before, in one transaction; returns how many were new.

        Two statements built once, so SQLAlchemy compiles each once: the events' INSERT … ON CONFLICT
        DO NOTHING … RETURNING, run as an executemany that SQLAlchemy sends as multi-row statements
        (its insertmanyvalues; SQLite >= 3.35 and PostgreSQL), then the new events' recipients. Rows go
        in the order given (the stream's): the row id orders events of the same time."""
        wanted = {e.event_id: e for e in events if storable(e)}
        if not wanted:
            return 0
        rows = [
            {
                "event_id": e.event_id,
                "account_id": e.account_id,
                "message_id": e.email.mail.message_id[:128],
                "event_type": type_name(e.email.event_type),
                "event_time": utc_datetime(e.time) if e.HasField("time") else self._clock.now(),
                "payload": e.SerializeToString(),
            }
            for e in wanted.values()
        ]
        async with transaction(self._sessions) as session:
            inserted = (await session.execute(self._add_events, rows)).all()
            recipients = [
                {
                    "event_row_id": row_id,
                    "account_id": wanted[event_id].account_id,
                    "address_key": key[:320],
                }
                for row_id, event_id in inserted
                for key in recipients_of(wanted[event_id].email)
            ]
            if recipients:
                await session.execute(self._add_recipients, recipients)
        return len(inserted)

    async def timeline(self, account_id: str, message_id: str) -> MessageTimeline:
        """Every kept event of one of the account's messages, oldest first."""
        if not message_id:
            raise InvalidArgument("message_id is required.", field="message_id")
        async with self._sessions() as session:
            payloads = (
                await session.scalars(
                    select(StoredEmailEvent.payload)
                    .where(
                        StoredEmailEvent.account_id == account_id, StoredEmailEvent.message_id == message_id
                    )
                    .order_by(StoredEmailEvent.event_time, StoredEmailEvent.id)
                    .limit(MAX_MESSAGE_EVENTS)
                )
            ).all()
        if not payloads:
            raise NotFound(f"No events of message {message_id} for this account.")
        return MessageTimeline(message_id, [ev.Event.FromString(p) for p in payloads])

    async def list(
        self, account_id: str, wanted: EventFilter, requested_size: int, token: str
    ) -> tuple[list[ev.Event], str]:
        """The account's events matching the filter, newest first, a page at a time."""
        size = page_size(requested_size)
        query = select(StoredEmailEvent.id, StoredEmailEvent.event_time, StoredEmailEvent.payload).where(
            StoredEmailEvent.account_id == account_id
        )
        if wanted.event_types:
            if any(
                t == ev.EMAIL_EVENT_TYPE_UNSPECIFIED or t not in ev.EmailEventType.values()
                for t in wanted.event_types
            ):
                raise InvalidArgument("event_types holds an unknown event type.", field="event_types")
            query = query.where(StoredEmailEvent.event_type.in_([type_name(t) for t in wanted.event_types]))
        if wanted.message_id:
            query = query.where(StoredEmailEvent.message_id == wanted.message_id)
        if wanted.recipient:
            key = address_key(normalize_address(wanted.recipient, field="recipient"))
            query = query.where(
                StoredEmailEvent.id.in_(
                    select(EmailEventRecipient.event_row_id).where(
                        EmailEventRecipient.account_id == account_id, EmailEventRecipient.address_key == key
                    )
                )
            )
        if wanted.start is not None:
            query = query.where(StoredEmailEvent.event_time >= wanted.start)
        if wanted.end is not None:
            query = query.where(StoredEmailEvent.event_time < wanted.end)
        if token:
            after_time, after_id = _decode(token)
            query = query.where(
                or_(
                    StoredEmailEvent.event_time < after_time,
                    and_(StoredEmailEvent.event_time == after_time, StoredEmailEvent.id < after_id),
                )
            )
        query = query.order_by(StoredEmailEvent.event_time.desc(), StoredEmailEvent.id.desc()).limit(size + 1)
        async with self._sessions() as session:
            rows = (await session.execute(query)).all()
        next_token = ""
        if len(rows) > size:
            rows = rows[:size]
            last_id, last_time, _ = rows[-1]
            next_token = encode_token([last_time.isoformat(), last_id])
        return [ev.Event.FromString(payload) for _, _, payload in rows], next_token

    async def expire(self, retention: dt.timedelta) -> int:
        """Forgets the events older than the retention; returns how many."""
        cutoff = self._clock.now() - retention
        async with transaction(self._sessions) as session:
            old = select(StoredEmailEvent.id).where(StoredEmailEvent.event_time < cutoff)
            await session.execute(
                delete(EmailEventRecipient).where(EmailEventRecipient.event_row_id.in_(old))
            )
            result = await session.execute(
                delete(StoredEmailEvent).where(StoredEmailEvent.event_time < cutoff)
            )
        return int(result.rowcount or 0)  # type: ignore[attr-defined]


def _decode(token: str) -> tuple[dt.datetime, int]:
    value = decode_token(token)
    try:
        when, row_id = value
        parsed = dt.datetime.fromisoformat(when)
        if parsed.tzinfo is None or not isinstance(row_id, int):
            raise ValueError
        return parsed, row_id
    except (TypeError, ValueError):
        raise InvalidArgument(
            "page_token is not a token this service returned.", field="page_token"
        ) from None
