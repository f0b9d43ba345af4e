"""The feedback service's one event consumer on a real nats-server and database: it takes over from
the three durables of earlier releases (timeline, sent index, router) at the least advanced of them,
so none of its steps misses an event, and deletes them; several processes starting it at once bind to
the same durable."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

from nats.aio.client import Client as NATS
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from nats.js.errors import NotFoundError
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from postmesh.common.bus import consume_events, consume_events_batched, ensure_streams, new_event
from postmesh.common.streams import ACCOUNT_EVENTS, EVENTS, EVENTS_SUBJECT_PREFIX, account_events_filter
from postmesh.events.v1 import events_pb2 as ev
from services.feedback.destinations.notifications import NONE, NotificationSettings
from services.feedback.destinations.routing import EventRouter
from services.feedback.event_consumer import FeedbackEvents, consume_feedback_events
from services.feedback.inbound.storage import SentMessages
from services.feedback.models import SentMessage, WebhookDelivery
from services.feedback.timeline.models import StoredEmailEvent
from services.feedback.timeline.store import EventStore
from tests.test_feedback_batches import START, Clock, consuming, sessions_on, settled, webhook_router

MESSAGES = 8
# How long an old durable is kept once nobody reads it (5 minutes in the service).
IDLE_SECONDS = 1.0


class Recording(FeedbackEvents):
    """The real steps, noting the events the consumer hands them."""

    def __init__(self, *, timeline: EventStore, sent: SentMessages, router: EventRouter) -> None:
        super().__init__(timeline=timeline, sent=sent, router=router)
        self.seen: list[str] = []

    async def handle_batch(self, events: list[ev.Event]) -> None:
        self.seen.extend(e.event_id for e in events)
        await super().handle_batch(events)


async def feedback_parts(
    js: JetStreamContext, nats: NATS, sessions: async_sessionmaker[AsyncSession], account: str
) -> tuple[EventStore, SentMessages, EventRouter]:
    """The steps' own objects, with a configuration set whose webhook takes every Send and Delivery."""

    async def lookup(account_id: str, identity: str) -> NotificationSettings:
        return NONE

    router = await webhook_router(js, nats, sessions, account, event_types="SEND,DELIVERY", lookup=lookup)
    return EventStore(sessions, Clock()), SentMessages(sessions, Clock()), router


def email_events(account: str) -> list[ev.Event]:
    """A Send and a Delivery per message, in that order."""
    events = []
    for i in range(MESSAGES):
        mail = ev.Mail(
            message_id=f"m{i}-{account}",
            source="me@example.test",
            destination=["you@example.test"],
            configuration_set_name="s",
            headers=[ev.Header(name="Message-ID", value=f"<m{i}@example.test>")],
        )
        mail.timestamp.FromDatetime(START)
        for kind in (ev.EMAIL_EVENT_TYPE_SEND, ev.EMAIL_EVENT_TYPE_DELIVERY):
            events.append(new_event(account, time=START, email=ev.EmailEvent(event_type=kind, mail=mail)))
    return events


async def old_durable(js: JetStreamContext, name: str, subject: str, *, events: int) -> None:
    """A durable as an earlier release declared it, its first `events` acked."""
    config = ConsumerConfig(
        durable_name=name,
        filter_subjects=[subject],
        ack_policy=AckPolicy.EXPLICIT,
        deliver_policy=DeliverPolicy.ALL,
        max_deliver=10,
        ack_wait=60,
    )
    await js.add_consumer(EVENTS.name, config)
    subscription = await js.pull_subscribe_bind(durable=name, stream=EVENTS.name)
    for message in await subscription.fetch(events, timeout=5):
        await message.ack()
    await subscription.unsubscribe()


def consumer(
    js: JetStreamContext, steps: FeedbackEvents, durable: str, subject: str, old: tuple[str, ...]
) -> Coroutine[Any, Any, None]:
    return consume_feedback_events(
        js, steps, durable=durable, subjects=[subject], replaces=old, replaced_idle_seconds=IDLE_SECONDS
    )


async def gone(js: JetStreamContext, durable: str) -> bool:
    try:
        await js.consumer_info(EVENTS.name, durable)
    except NotFoundError:
        return True
    return False


async def until_gone(js: JetStreamContext, durables: tuple[str, ...]) -> None:
    deadline = time.monotonic() + 30
    while not all([await gone(js, name) for name in durables]):
        assert time.monotonic() < deadline, "the old durables were never deleted"
        await asyncio.sleep(0.2)


async def test_the_consumer_takes_over_from_the_old_durables_where_the_least_advanced_stood(
    nats: NATS, tmp_path: Path
) -> None:
    js = nats.jetstream()
    await ensure_streams(js, [ACCOUNT_EVENTS])
    sessions = await sessions_on(f"sqlite+aiosqlite:///{tmp_path / 'feedback.db'}")
    account = f"acct{uuid.uuid4().hex[:12]}"
    base = f"{EVENTS_SUBJECT_PREFIX}.test.{uuid.uuid4().hex}"
    store, index, router = await feedback_parts(js, nats, sessions, account)
    events = email_events(account)
    sequences = []
    for event in events:
        kind = "send" if event.email.event_type == ev.EMAIL_EVENT_TYPE_SEND else "delivery"
        sequences.append((await js.publish(f"{base}.{kind}", event.SerializeToString())).seq)
    tag = uuid.uuid4().hex[:8]
    old = (f"old-timeline-{tag}", f"old-sent-{tag}", f"old-router-{tag}")
    # The old consumers at different positions, each having done its own step for what it acked:
    # the timeline 12 events in, the router 7, the sent index 3 Send events (6 events) in.
    await old_durable(js, old[0], f"{base}.>", events=12)
    await store.record(events[:12])
    await old_durable(js, old[2], f"{base}.>", events=7)
    await router.publish(events[:7])
    for event in events[:7]:
        await router.route(event)
    await old_durable(js, old[1], f"{base}.send", events=3)
    await index.record_many((e.account_id, e.email.mail) for e in events[:6:2])

    durable = f"test-feedback-events-{tag}"
    steps = Recording(timeline=store, sent=index, router=router)
    # Two processes starting at once (workers of one machine): both bind to the one durable.
    async with (
        consuming(consumer(js, steps, durable, f"{base}.>", old)),
        consuming(consumer(js, steps, durable, f"{base}.>", old)),
    ):
        await settled(js, durable, lambda: len(set(steps.seen)) >= len(events) - 5)
        await asyncio.sleep(0.3)

    # From the least advanced floor (the sent index's: the third Send, events[4]), not from the start.
    assert sorted(set(steps.seen)) == sorted(e.event_id for e in events[5:])
    info = await js.consumer_info(EVENTS.name, durable)
    assert (info.config.deliver_policy, info.config.opt_start_seq) == (
        DeliverPolicy.BY_START_SEQUENCE,
        sequences[4] + 1,
    )
    await until_gone(js, old)
    # Every step has every event, once.
    async with sessions() as session:
        stored = await session.scalar(
            select(func.count()).select_from(StoredEmailEvent).where(StoredEmailEvent.account_id == account)
        )
        indexed = await session.scalar(
            select(func.count()).select_from(SentMessage).where(SentMessage.account_id == account)
        )
        queued = await session.scalar(
            select(func.count()).select_from(WebhookDelivery).where(WebhookDelivery.account_id == account)
        )
    assert (stored, indexed, queued) == (len(events), MESSAGES, len(events))
    streamed = await js.stream_info(ACCOUNT_EVENTS.name, subjects_filter=account_events_filter(account))
    assert sum((streamed.state.subjects or {}).values()) == len(events)

    # Started again: the durable goes on where it is, with nothing to do again.
    handed = len(steps.seen)
    async with consuming(consumer(js, steps, durable, f"{base}.>", old)):
        await settled(js, durable, lambda: True)
        await asyncio.sleep(0.3)
    assert len(steps.seen) == handed
    await sessions.kw["bind"].dispose()


async def test_without_old_durables_the_consumer_reads_the_whole_stream(nats: NATS, tmp_path: Path) -> None:
    js = nats.jetstream()
    await ensure_streams(js, [ACCOUNT_EVENTS])
    sessions = await sessions_on(f"sqlite+aiosqlite:///{tmp_path / 'feedback.db'}")
    account = f"acct{uuid.uuid4().hex[:12]}"
    subject = f"{EVENTS_SUBJECT_PREFIX}.test.{uuid.uuid4().hex}"
    store, index, router = await feedback_parts(js, nats, sessions, account)
    events = email_events(account)
    for event in events:
        await js.publish(subject, event.SerializeToString())
    steps = Recording(timeline=store, sent=index, router=router)
    durable = f"test-feedback-events-{uuid.uuid4().hex[:8]}"
    async with consuming(consumer(js, steps, durable, subject, (f"gone-{durable}",))):
        await settled(js, durable, lambda: len(steps.seen) >= len(events))
    assert steps.seen == [e.event_id for e in events]
    info = await js.consumer_info(EVENTS.name, durable)
    assert info.config.deliver_policy == DeliverPolicy.ALL
    await sessions.kw["bind"].dispose()


async def test_an_old_durable_an_earlier_release_still_reads_is_kept_until_it_stops(nats: NATS) -> None:
    """A rolling upgrade: the replica of the earlier release goes on reading its durable (deleted, its
    loop would declare it again from the start of the stream and route every kept event again)."""
    js = nats.jetstream()
    tag = uuid.uuid4().hex[:8]
    subject = f"{EVENTS_SUBJECT_PREFIX}.test.{uuid.uuid4().hex}"
    old = f"old-router-{tag}"
    durable = f"test-feedback-events-{tag}"
    read: list[str] = []

    async def old_route(event: ev.Event) -> None:
        read.append(event.event_id)

    events = email_events("acct")
    await js.publish(subject, events[0].SerializeToString())
    async with consuming(consume_events(js, durable=old, subjects=[subject], handle=old_route)):
        await settled(js, old, lambda: len(read) == 1)
        async with consuming(
            consume_events_batched(
                js,
                durable=durable,
                subjects=[subject],
                handle_batch=lambda batch: asyncio.sleep(0),
                replaces=(old,),
                replaced_idle_seconds=IDLE_SECONDS,
            )
        ):
            await settled(js, durable, lambda: True)
            await asyncio.sleep(4 * IDLE_SECONDS)
            assert not await gone(js, old)
            await js.publish(subject, events[1].SerializeToString())
            await settled(js, old, lambda: len(read) == 2)
    await until_gone(js, (old,))
    assert read == [e.event_id for e in events[:2]]
