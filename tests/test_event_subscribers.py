"""The account streams hold only the events of accounts with a SubscribeEvents subscription, on a real
nats-server: a subscription opened in another process is seen by the router from its very next
batch, accounts without one get no copies, and subscriptions of an earlier release (a consumer with no
mark) are marked from the stream's consumers."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Sequence

import pytest
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from postmesh.common.bus import fetch_batch, new_event
from postmesh.common.pull import Puller
from postmesh.common.streams import ACCOUNT_EVENTS, account_events_filter
from postmesh.events.v1 import events_pb2 as ev
from services.feedback.destinations import subscribers as subscribers_module
from services.feedback.destinations import subscriptions as subscriptions_module
from services.feedback.destinations.notifications import NONE, IdentityNotifications, NotificationSettings
from services.feedback.destinations.routing import EventRouter
from services.feedback.destinations.subscribers import SubscribedAccounts
from services.feedback.destinations.subscriptions import Opening, Subscriptions, consumer_name


async def no_notifications(account_id: str, identity: str) -> NotificationSettings:
    return NONE


def router_on(js: JetStreamContext, nats: NATS, subscribers: SubscribedAccounts) -> EventRouter:
    # Events without a configuration set: publish() is all the router does with them.
    return EventRouter(
        js=js,
        nats=nats,
        sets=None,  # type: ignore[arg-type]
        outbox=None,  # type: ignore[arg-type]
        subject_prefix="user",
        queued=lambda: None,
        notifications=IdentityNotifications(no_notifications),
        subscribers=subscribers,
    )


def bounces(account: str, count: int) -> list[ev.Event]:
    return [
        new_event(
            account,
            email=ev.EmailEvent(
                event_type=ev.EMAIL_EVENT_TYPE_BOUNCE,
                mail=ev.Mail(message_id=uuid.uuid4().hex),
                bounce=ev.Bounce(bounce_type=ev.BOUNCE_TYPE_PERMANENT),
            ),
        )
        for _ in range(count)
    ]


async def copies(js: JetStreamContext, account: str) -> int:
    info = await js.stream_info(ACCOUNT_EVENTS.name, subjects_filter=account_events_filter(account))
    return sum((info.state.subjects or {}).values())


def new_account() -> str:
    return f"acct{uuid.uuid4().hex[:12]}"


async def taken(puller: Puller, count: int, within: float = 3.0) -> list[ev.Event]:
    """What a subscription's consumer hands out, until `count` events or `within` seconds."""
    events: list[ev.Event] = []
    deadline = time.monotonic() + within
    while len(events) < count and time.monotonic() < deadline:
        events += [ev.Event.FromString(m.data) for m in await fetch_batch(puller, count - len(events), 1.0)]
    return events


async def silent_client() -> AsyncIterator[Sequence[str]]:
    """A SubscribeEvents client that acknowledges nothing."""
    await asyncio.sleep(3600)
    yield []


async def test_a_subscription_opened_elsewhere_gets_the_next_batch_and_nothing_is_copied_before(
    nats: NATS, nats_url: str
) -> None:
    import nats as nats_client

    js = nats.jetstream()
    router = router_on(js, nats, SubscribedAccounts(js))
    followed, unfollowed = new_account(), new_account()
    await router.publish([*bounces(followed, 3), *bounces(unfollowed, 3)])
    assert (await copies(js, followed), await copies(js, unfollowed)) == (0, 0)

    # Another process (its own connection and its own kept set) opens a subscription; the router,
    # whose set was read a moment ago, routes the very next batch once the opening returned.
    other = await nats_client.connect(nats_url)
    try:
        other_js = other.jetstream()
        opened = Subscriptions(
            other_js, subscribers=SubscribedAccounts(other_js), max_unacked=100, ack_wait=30
        )
        subscription = await opened.open(followed, Opening("s", []))
        after = [*bounces(followed, 4), *bounces(unfollowed, 4)]
        await router.publish(after)
        assert (await copies(js, followed), await copies(js, unfollowed)) == (4, 0)
        received = await taken(subscription, 5)  # one more than was copied: none may come
        assert [e.event_id for e in received] == [e.event_id for e in after[:4]]
        await subscription.unsubscribe()
        await opened.delete(followed, "s")
    finally:
        await other.close()


async def test_subscriptions_without_a_mark_are_marked_from_the_streams_consumers(nats: NATS) -> None:
    js = nats.jetstream()
    subscribers = SubscribedAccounts(js)
    router = router_on(js, nats, subscribers)
    account = new_account()
    # As an earlier release opened a subscription: the consumer alone, no mark.
    durable = consumer_name(account, "old")
    await js.add_consumer(
        ACCOUNT_EVENTS.name,
        ConsumerConfig(
            durable_name=durable,
            filter_subjects=[f"{account_events_filter(account)[:-2]}.bounce"],
            ack_policy=AckPolicy.EXPLICIT,
            deliver_policy=DeliverPolicy.NEW,
        ),
    )
    try:
        await router.publish(bounces(account, 2))
        assert await copies(js, account) == 0
        assert await subscribers.mark_existing() >= 1
        assert account in await subscribers.current()
        assert await subscribers.mark_existing() == 0  # nothing left unmarked
        await router.publish(bounces(account, 2))
        assert await copies(js, account) == 2
        old = await Puller.bind(js, stream=ACCOUNT_EVENTS.name, durable=durable)
        assert len(await taken(old, 3)) == 2
        await old.unsubscribe()
    finally:
        await js.delete_consumer(ACCOUNT_EVENTS.name, durable)


async def test_a_followed_subscription_marks_its_account_again(
    nats: NATS, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A subscription followed longer than the marks live keeps its account marked."""
    monkeypatch.setattr(subscriptions_module, "REMARK_SECONDS", 0.0)
    js = nats.jetstream()
    subscribers = SubscribedAccounts(js)
    subscriptions = Subscriptions(js, subscribers=subscribers, max_unacked=10, ack_wait=30)
    account = new_account()
    subscription = await subscriptions.open(account, Opening("s", []))
    bucket = await js.key_value(subscribers_module.BUCKET)
    opened_revision = (await bucket.get(account)).revision or 0

    following = subscriptions.follow(account, subscription, silent_client())
    router = router_on(js, nats, subscribers)
    await router.publish(bounces(account, 1))
    event = await anext(following)
    assert event.account_id == account
    await following.aclose()  # type: ignore[attr-defined]
    assert ((await bucket.get(account)).revision or 0) > opened_revision
    await subscriptions.delete(account, "s")


async def test_a_busy_router_reads_the_subscribers_about_twice_a_fresh_period(
    nats: NATS, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Not a request per batch: the set is read again in the background once half its allowed age."""
    js = nats.jetstream()
    subscribers = SubscribedAccounts(js, fresh_seconds=0.4)
    reads = 0
    read = subscribers._bucket_state

    async def counted() -> tuple[int, int]:
        nonlocal reads
        reads += 1
        return await read()

    monkeypatch.setattr(subscribers, "_bucket_state", counted)
    started = time.monotonic()
    calls = 0
    while time.monotonic() - started < 1.0:
        await subscribers.current()
        calls += 1
        await asyncio.sleep(0.002)
    assert calls > 100
    assert 2 <= reads <= 8  # every 0.2 s or so (at most 6), never a request per call
