"""The feedback service's batch consumers on a real nats-server and database: the sent-message index
and the event router take a fetched batch at a time (bus.consume_events_batched), yet one bad event
is retried alone and dropped after max_deliver while the others of its batch go through, and
redelivered events add no second index row, account-stream event or webhook row."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from postmesh.common import db
from postmesh.common.bus import consume_events, consume_events_batched, ensure_streams, new_event
from postmesh.common.streams import ACCOUNT_EVENTS, EVENTS, EVENTS_SUBJECT_PREFIX, account_events_filter
from postmesh.events.v1 import events_pb2 as ev
from services.feedback.configsets import CONFIRMED, WEBHOOK, ConfigurationSets
from services.feedback.destinations.notifications import NONE, IdentityNotifications, NotificationSettings
from services.feedback.destinations.routing import EventRouter
from services.feedback.destinations.subscribers import SubscribedAccounts
from services.feedback.destinations.webhooks import WebhookOutbox
from services.feedback.inbound.storage import SentMessages
from services.feedback.inbound.wiring import sent_mails
from services.feedback.models import Base, ConfigurationSet, EventDestination, SentMessage, WebhookDelivery
from services.feedback.service import FeedbackService

MAX_DELIVER = 3
START = dt.datetime(2026, 3, 2, 10, 0, tzinfo=dt.UTC)


class Clock:
    def now(self) -> dt.datetime:
        return START


async def sessions_on(url: str) -> async_sessionmaker[AsyncSession]:
    engine = db.create_engine(url)
    assert FeedbackService.migrations_dir is not None
    await db.migrate(engine, FeedbackService.migrations_dir, "alembic_version_feedback", Base.metadata)
    return db.session_factory(engine)


def send_event(account: str, message_id: str, *, seconds: int = 0) -> ev.Event:
    mail = ev.Mail(
        message_id=message_id,
        source="me@example.test",
        destination=["you@example.test"],
        headers=[ev.Header(name="Message-ID", value=f"<{message_id}@example.test>")],
    )
    mail.timestamp.FromDatetime(START + dt.timedelta(seconds=seconds))
    return new_event(account, time=START, email=ev.EmailEvent(event_type=ev.EMAIL_EVENT_TYPE_SEND, mail=mail))


async def publish_all(js: JetStreamContext, subject: str, events: list[ev.Event]) -> None:
    """On a subject of the test's own (in the events stream), so other tests' events stay out."""
    for event in events:
        await js.publish(subject, event.SerializeToString())


@contextlib.asynccontextmanager
async def consuming(consumer: Awaitable[None]) -> AsyncIterator[None]:
    task = asyncio.ensure_future(consumer)
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def settled(js: JetStreamContext, durable: str, done: Callable[[], bool]) -> None:
    """Until `done` holds and the durable has nothing left to deliver or to hear back about."""

    async def idle() -> bool:
        try:
            info = await js.consumer_info(EVENTS.name, durable)
        except Exception:  # not declared yet
            return False
        return info.num_pending == 0 and info.num_ack_pending == 0

    deadline = time.monotonic() + 60
    while not (done() and await idle()):
        assert time.monotonic() < deadline, "the consumer never settled"
        await asyncio.sleep(0.05)


async def test_a_failing_batch_is_taken_apart_and_the_bad_event_dropped_after_max_deliver(
    nats: NATS,
) -> None:
    js = nats.jetstream()
    subject = f"{EVENTS_SUBJECT_PREFIX}.test.{uuid.uuid4().hex}"
    durable = f"test-batched-{uuid.uuid4().hex[:8]}"
    events = [send_event("acct", f"m{i}") for i in range(10)]
    poison = events[4].event_id
    calls: list[list[str]] = []

    async def handle_batch(batch: list[ev.Event]) -> None:
        calls.append([e.event_id for e in batch])
        if poison in calls[-1]:
            raise ValueError("poisonous")

    await publish_all(js, subject, events)
    async with consuming(
        consume_events_batched(
            js,
            durable=durable,
            subjects=[subject],
            handle_batch=handle_batch,
            max_deliver=MAX_DELIVER,
            retry_delay=0.05,
        )
    ):
        await settled(js, durable, lambda: calls.count([poison]) >= MAX_DELIVER)
        await asyncio.sleep(0.5)  # long enough for a redelivery that should not come

    # The whole batch in one call; then each event alone, the bad one tried MAX_DELIVER times in all.
    assert calls[0] == [e.event_id for e in events]
    assert sorted(calls[1:], key=lambda c: c[0] != poison) == [[poison]] * MAX_DELIVER + [
        [e.event_id] for e in events if e.event_id != poison
    ]
    info = await js.consumer_info(EVENTS.name, durable)
    assert (info.num_pending, info.num_ack_pending) == (0, 0)


async def test_a_failing_event_step_retries_that_event_alone(nats: NATS) -> None:
    js = nats.jetstream()
    subject = f"{EVENTS_SUBJECT_PREFIX}.test.{uuid.uuid4().hex}"
    durable = f"test-batched-{uuid.uuid4().hex[:8]}"
    events = [send_event("acct", f"m{i}") for i in range(10)]
    poison = events[0].event_id
    batches: list[list[str]] = []
    handled: list[str] = []

    async def handle_batch(batch: list[ev.Event]) -> None:
        batches.append([e.event_id for e in batch])

    async def handle_event(event: ev.Event) -> None:
        handled.append(event.event_id)
        if event.event_id == poison:
            raise ValueError("poisonous")

    await publish_all(js, subject, events)
    async with consuming(
        consume_events_batched(
            js,
            durable=durable,
            subjects=[subject],
            handle_batch=handle_batch,
            handle_event=handle_event,
            max_deliver=MAX_DELIVER,
            retry_delay=0.05,
        )
    ):
        await settled(js, durable, lambda: handled.count(poison) >= MAX_DELIVER)
        await asyncio.sleep(0.5)

    assert batches == [[e.event_id for e in events]] + [[poison]] * (MAX_DELIVER - 1)
    assert sorted(handled) == sorted([e.event_id for e in events] + [poison] * (MAX_DELIVER - 1))


@pytest.mark.parametrize("batched", [True, False])
async def test_events_wait_out_an_outage_longer_than_max_deliver_tries(nats: NATS, batched: bool) -> None:
    """A step failing because a dependency is out (the database unreachable) is retried in place, not
    counted as a try: after the outage every event is handled, none dropped."""
    js = nats.jetstream()
    subject = f"{EVENTS_SUBJECT_PREFIX}.test.{uuid.uuid4().hex}"
    durable = f"test-outage-{uuid.uuid4().hex[:8]}"
    events = [send_event("acct", f"m{i}") for i in range(5)]
    failures_left = 20 * MAX_DELIVER  # more than every event's tries together
    handled: list[str] = []

    async def handle_batch(batch: list[ev.Event]) -> None:
        nonlocal failures_left
        if failures_left > 0:
            failures_left -= 1
            raise ConnectionRefusedError("the database is down")
        handled.extend(e.event_id for e in batch)

    async def handle(event: ev.Event) -> None:
        await handle_batch([event])

    consumer = (
        consume_events_batched(
            js,
            durable=durable,
            subjects=[subject],
            handle_batch=handle_batch,
            max_deliver=MAX_DELIVER,
            retry_delay=0.05,
        )
        if batched
        else consume_events(
            js, durable=durable, subjects=[subject], handle=handle, max_deliver=MAX_DELIVER, retry_delay=0.05
        )
    )
    await publish_all(js, subject, events)
    async with consuming(consumer):
        await settled(js, durable, lambda: len(handled) >= len(events))

    assert failures_left == 0
    assert sorted(handled) == sorted(e.event_id for e in events)


async def test_an_event_step_waiting_out_an_outage_lets_the_events_before_it_go(nats: NATS) -> None:
    """The event step of one event fails while a dependency is out: it is retried in place (not
    counted as a try) until the outage ends, and the events handled before it are acknowledged
    meanwhile, not held back with it."""
    js = nats.jetstream()
    subject = f"{EVENTS_SUBJECT_PREFIX}.test.{uuid.uuid4().hex}"
    durable = f"test-step-outage-{uuid.uuid4().hex[:8]}"
    events = [send_event("acct", f"m{i}") for i in range(10)]
    waiting = events[4].event_id
    failures_left = 10 * MAX_DELIVER
    handled: list[str] = []
    ack_pending_during_outage: list[int] = []

    async def handle_batch(batch: list[ev.Event]) -> None:
        pass

    async def handle_event(event: ev.Event) -> None:
        nonlocal failures_left
        if event.event_id == waiting and failures_left > 0:
            failures_left -= 1
            if failures_left == 5:
                info = await js.consumer_info(EVENTS.name, durable)
                ack_pending_during_outage.append(info.num_ack_pending)
            raise ConnectionRefusedError("the identity service is down")
        handled.append(event.event_id)

    await publish_all(js, subject, events)
    async with consuming(
        consume_events_batched(
            js,
            durable=durable,
            subjects=[subject],
            handle_batch=handle_batch,
            handle_event=handle_event,
            max_deliver=MAX_DELIVER,
            retry_delay=0.05,
        )
    ):
        await settled(js, durable, lambda: len(handled) >= len(events))

    assert failures_left == 0
    assert handled == [e.event_id for e in events]
    assert ack_pending_during_outage == [6]  # the waiting event and the five after it


async def test_a_consumer_stopped_midway_through_a_batch_acks_the_events_it_handled(nats: NATS) -> None:
    js = nats.jetstream()
    subject = f"{EVENTS_SUBJECT_PREFIX}.test.{uuid.uuid4().hex}"
    durable = f"test-stopped-{uuid.uuid4().hex[:8]}"
    events = [send_event("acct", f"m{i}") for i in range(6)]
    reached = asyncio.Event()

    async def handle_batch(batch: list[ev.Event]) -> None:
        pass

    async def handle_event(event: ev.Event) -> None:
        if event.event_id == events[2].event_id:
            reached.set()
            await asyncio.Event().wait()  # never done: the consumer is stopped here

    await publish_all(js, subject, events)
    async with consuming(
        consume_events_batched(
            js, durable=durable, subjects=[subject], handle_batch=handle_batch, handle_event=handle_event
        )
    ):
        await asyncio.wait_for(reached.wait(), 30)
    await nats.flush()
    info = await js.consumer_info(EVENTS.name, durable)
    assert (info.num_ack_pending, info.num_pending) == (4, 0)  # the two handled ones are acked


async def test_a_durable_of_the_one_event_at_a_time_consumer_is_taken_over_as_it_is(nats: NATS) -> None:
    """A durable of consume_events keeps its configuration under consume_events_batched: one an
    earlier release declared, part way through its events, goes on where it was."""
    js = nats.jetstream()
    subject = f"{EVENTS_SUBJECT_PREFIX}.test.{uuid.uuid4().hex}"
    durable = f"test-takeover-{uuid.uuid4().hex[:8]}"
    # As postmesh.common.bus.consume_events declared it before the batch consumers.
    old = ConsumerConfig(
        durable_name=durable,
        filter_subjects=[subject],
        ack_policy=AckPolicy.EXPLICIT,
        deliver_policy=DeliverPolicy.ALL,
        max_deliver=10,
        ack_wait=60,
    )
    await js.add_consumer(EVENTS.name, old)
    events = [send_event("acct", f"m{i}") for i in range(6)]
    await publish_all(js, subject, events[:4])
    subscription = await js.pull_subscribe_bind(durable=durable, stream=EVENTS.name)
    for message in await subscription.fetch(2, timeout=5):
        await message.ack()  # the old consumer's work before it stopped
    await subscription.unsubscribe()
    await publish_all(js, subject, events[4:])
    seen: list[str] = []

    async def handle_batch(batch: list[ev.Event]) -> None:
        seen.extend(e.event_id for e in batch)

    async with consuming(
        consume_events_batched(js, durable=durable, subjects=[subject], handle_batch=handle_batch)
    ):
        await settled(js, durable, lambda: len(seen) >= 4)

    assert seen == [e.event_id for e in events[2:]]
    info = await js.consumer_info(EVENTS.name, durable)
    assert (info.config.max_deliver, info.config.ack_wait, info.config.filter_subjects) == (10, 60, [subject])


async def _indexed(sessions: async_sessionmaker[AsyncSession]) -> list[tuple[str, str, str, dt.datetime]]:
    async with sessions() as session:
        rows = await session.scalars(select(SentMessage).order_by(SentMessage.message_id))
        return [(r.message_id, r.account_id, r.header_message_id, r.sent_at) for r in rows]


async def test_the_sent_index_records_a_batch_once_whatever_comes_again(database_url: str) -> None:
    sessions = await sessions_on(database_url)
    index = SentMessages(sessions, Clock())
    first = [send_event("acct-a", "m1", seconds=1), send_event("acct-a", "m2", seconds=2)]
    # The same message twice in one batch (a Send published again), and a redelivered batch.
    await index.record_many(sent_mails([*first, send_event("acct-b", "m1", seconds=9)]))
    await index.record_many(sent_mails([send_event("acct-b", "m2", seconds=9), *first]))
    await index.record_many(sent_mails([send_event("acct-a", "m3", seconds=3), first[0]]))
    assert await _indexed(sessions) == [
        ("m1", "acct-a", "m1@example.test", START + dt.timedelta(seconds=1)),
        ("m2", "acct-a", "m2@example.test", START + dt.timedelta(seconds=2)),
        ("m3", "acct-a", "m3@example.test", START + dt.timedelta(seconds=3)),
    ]
    await index.record_many([])
    assert (await index.by_header("m2@example.test")) is not None
    await sessions.kw["bind"].dispose()


async def test_the_sent_index_consumer_drops_a_bad_send_and_indexes_the_rest_once(
    nats: NATS, database_url: str
) -> None:
    js = nats.jetstream()
    sessions = await sessions_on(database_url)
    index = SentMessages(sessions, Clock())
    subject = f"{EVENTS_SUBJECT_PREFIX}.test.{uuid.uuid4().hex}"
    durable = f"test-sent-index-{uuid.uuid4().hex[:8]}"
    events = [send_event("acct", f"m{i}", seconds=i) for i in range(8)]
    # A timestamp no datetime can hold: the index cannot take this one, on any database.
    events[3].email.mail.timestamp.seconds = 10**15
    tries: list[int] = []

    async def handle_batch(batch: list[ev.Event]) -> None:
        tries.append(len(batch))
        await index.record_many(sent_mails(batch))

    await publish_all(js, subject, [*events, *events[:2]])  # two Send events published again
    async with consuming(
        consume_events_batched(
            js,
            durable=durable,
            subjects=[subject],
            handle_batch=handle_batch,
            max_deliver=MAX_DELIVER,
            retry_delay=0.05,
        )
    ):
        await settled(js, durable, lambda: tries.count(1) >= 10 + MAX_DELIVER - 1)

    assert [row[0] for row in await _indexed(sessions)] == [f"m{i}" for i in range(8) if i != 3]
    await sessions.kw["bind"].dispose()


async def webhook_router(
    js: JetStreamContext,
    nats: NATS,
    sessions: async_sessionmaker[AsyncSession],
    account: str,
    *,
    event_types: str,
    lookup: Callable[[str, str], Awaitable[NotificationSettings]],
) -> EventRouter:
    """An EventRouter over the database, with the account's configuration set "s" whose confirmed
    webhook takes `event_types`; identity notification settings come from `lookup`. The account is
    marked as subscribed, so its events are copied onto the account stream."""
    subscribers = SubscribedAccounts(js)
    await subscribers.mark(account)
    async with db.transaction(sessions) as session:
        owner = ConfigurationSet(account_id=account, name="s", created_at=START)
        session.add(owner)
        await session.flush()
        session.add(
            EventDestination(
                configuration_set_id=owner.id,
                account_id=account,
                name="hook",
                enabled=True,
                event_types=event_types,
                kind=WEBHOOK,
                target="http://hooks.example.test/ses",
                format="JSON",
                subscription_status=CONFIRMED,
                sealed_secret=b"",
                created_at=START,
            )
        )

    async def changed(account_id: str, name: str) -> None:
        pass

    return EventRouter(
        js=js,
        nats=nats,
        sets=ConfigurationSets(sessions, Clock(), changed=changed),
        outbox=WebhookOutbox(
            sessions, Clock(), retry_period=dt.timedelta(hours=1), backoff=1.0, backoff_max=1.0
        ),
        subject_prefix="user",
        queued=lambda: None,
        notifications=IdentityNotifications(lookup),
        subscribers=subscribers,
    )


async def test_routing_a_batch_publishes_each_event_once_and_retries_only_the_bad_one(
    nats: NATS, tmp_path: Path
) -> None:
    js = nats.jetstream()
    await ensure_streams(js, [ACCOUNT_EVENTS])
    sessions = await sessions_on(f"sqlite+aiosqlite:///{tmp_path / 'feedback.db'}")
    account = f"acct{uuid.uuid4().hex[:12]}"
    lookups: list[str] = []

    async def lookup(account_id: str, identity: str) -> NotificationSettings:
        lookups.append(identity)
        if identity == "broken.example.test":
            # An error of the event's own (an outage, say ConnectionError, is waited out instead).
            raise ValueError("the identity service refused this identity")
        return NONE

    router = await webhook_router(js, nats, sessions, account, event_types="BOUNCE", lookup=lookup)
    events = []
    for i in range(10):
        mail = ev.Mail(
            message_id=f"m{i}",
            configuration_set_name="s",
            source_identity="broken.example.test" if i == 6 else "example.test",
        )
        bounce = ev.Bounce(bounce_type=ev.BOUNCE_TYPE_PERMANENT)
        events.append(
            new_event(
                account, email=ev.EmailEvent(event_type=ev.EMAIL_EVENT_TYPE_BOUNCE, mail=mail, bounce=bounce)
            )
        )
    subject = f"{EVENTS_SUBJECT_PREFIX}.test.{uuid.uuid4().hex}"
    durable = f"test-routing-{uuid.uuid4().hex[:8]}"
    await publish_all(js, subject, [*events, *events[:3]])  # three of them published again
    async with consuming(
        consume_events_batched(
            js,
            durable=durable,
            subjects=[subject],
            handle_batch=router.publish,
            handle_event=router.route,
            max_deliver=MAX_DELIVER,
            retry_delay=0.05,
        )
    ):
        await settled(js, durable, lambda: lookups.count("broken.example.test") >= MAX_DELIVER)
        await asyncio.sleep(0.5)

    assert lookups.count("broken.example.test") == MAX_DELIVER
    info = await js.stream_info(ACCOUNT_EVENTS.name, subjects_filter=account_events_filter(account))
    assert sum((info.state.subjects or {}).values()) == 10  # each event once, however often it came
    async with sessions() as session:
        rows = await session.scalar(
            select(func.count()).select_from(WebhookDelivery).where(WebhookDelivery.account_id == account)
        )
    assert rows == 10  # the bad one's too: it was routed before its notification failed
    await sessions.kw["bind"].dispose()
