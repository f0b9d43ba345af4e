"""SNS-format subscriptions without a mesh, on each database: the handshake, confirmation (by token or by
the account), unsubscription, the messages the dispatcher posts, and hostile SubscribeURL and
UnsubscribeURL parameters (property-based) that never confirm or end anything."""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from postmesh.common import db
from postmesh.common.bus import new_event
from postmesh.common.errors import FailedPrecondition, NotFound
from postmesh.events.v1 import events_pb2 as ev
from services.feedback.configsets import CONFIRMED, PENDING_CONFIRMATION
from services.feedback.destinations.sns import SnsFormat, SnsSigner, string_to_sign
from services.feedback.destinations.sns_keys import load_or_create
from services.feedback.destinations.sns_subscriptions import (
    EVENT_SUBJECT,
    SUBSCRIBE,
    UNSUBSCRIBE,
    SnsSubscriptions,
)
from services.feedback.destinations.webhooks import EVENT, NOTIFICATION
from services.feedback.models import Base, ConfigurationSet, EventDestination, WebhookDelivery


class Clock:
    def now(self) -> dt.datetime:
        return dt.datetime.now(dt.UTC)


@dataclass
class World:
    subscriptions: SnsSubscriptions
    sessions: async_sessionmaker[AsyncSession]
    changed: list[tuple[str, str]]
    signer: SnsSigner


async def _world(database_url: str, tmp_path: Path) -> World:
    engine = db.create_engine(database_url)
    async with engine.begin() as connection:
        await connection.run_sync(Base.metadata.create_all)
    sessions = db.session_factory(engine)
    identity = load_or_create(host="localhost", data_dir=tmp_path)
    signer = SnsSigner(identity.private_key, "https://localhost/cert.pem")
    changed: list[tuple[str, str]] = []

    async def note(account_id: str, name: str) -> None:
        changed.append((account_id, name))

    subscriptions = SnsSubscriptions(
        sessions,
        Clock(),
        sns=SnsFormat(signer=signer, endpoint="https://localhost"),
        region="postmesh",
        changed=note,
        queued=lambda: None,
    )
    async with db.transaction(sessions) as session:
        owner = ConfigurationSet(account_id="acct1", name="app", created_at=Clock().now())
        session.add(owner)
        await session.flush()
        for name, fmt, status in (("sns", "SNS", PENDING_CONFIRMATION), ("json", "JSON", CONFIRMED)):
            session.add(
                EventDestination(
                    configuration_set_id=owner.id,
                    account_id="acct1",
                    name=name,
                    enabled=True,
                    event_types="BOUNCE",
                    kind="webhook",
                    target="https://example.test/hook",
                    format=fmt,
                    subscription_status=status,
                    signature_version=2,
                    sealed_secret=b"",
                    created_at=Clock().now(),
                )
            )
    return World(subscriptions, sessions, changed, signer)


async def _state(world: World) -> tuple[EventDestination, list[WebhookDelivery]]:
    async with world.sessions() as session:
        row = await session.scalar(select(EventDestination).where(EventDestination.name == "sns"))
        rows = list(await session.scalars(select(WebhookDelivery).order_by(WebhookDelivery.id)))
    assert row is not None
    return row, rows


def _verifies(body: dict[str, str], signer: SnsSigner) -> bool:
    digest = hashes.SHA1() if body["SignatureVersion"] == "1" else hashes.SHA256()
    signer.private_key.public_key().verify(
        base64.b64decode(body["Signature"]), string_to_sign(body), padding.PKCS1v15(), digest
    )
    return True


async def test_a_subscription_is_confirmed_then_ended_as_sns_does(database_url: str, tmp_path: Path) -> None:
    world = await _world(database_url, tmp_path)
    subscriptions = world.subscriptions
    await subscriptions.subscribe("acct1", "app", "sns")
    row, queued = await _state(world)
    assert row.topic_arn == "arn:postmesh:sns:postmesh:acct1:app-sns" and row.subscription_id == ""
    assert [q.shape for q in queued] == [SUBSCRIBE]
    token = queued[0].event.decode()
    assert token not in row.subscription_token_hash and len(row.subscription_token_hash) == 64

    handshake = subscriptions.request(row, queued[0])
    body = json.loads(handshake.body)
    assert body["Type"] == "SubscriptionConfirmation" and body["Token"] == token
    assert body["TopicArn"] == row.topic_arn and body["SignatureVersion"] == "2"
    assert _verifies(body, world.signer)
    assert handshake.headers["x-amz-sns-message-type"] == "SubscriptionConfirmation"

    assert await subscriptions.confirm(row.topic_arn, token + "0") is None
    assert await subscriptions.confirm(row.topic_arn.replace("acct1", "acct2"), token) is None
    arn = await subscriptions.confirm(row.topic_arn, token)
    assert arn is not None and arn.startswith(row.topic_arn + ":")
    assert await subscriptions.confirm(row.topic_arn, token) == arn  # a second fetch: the same ARN
    row, queued = await _state(world)
    assert row.subscription_status == CONFIRMED and queued == []  # the handshake has nothing left to say
    assert ("acct1", "app") in world.changed

    # A notification: the event's SES JSON in Message, signed, the same MessageId on every attempt.
    event = new_event(
        "acct1",
        email=ev.EmailEvent(
            event_type=ev.EMAIL_EVENT_TYPE_BOUNCE,
            mail=ev.Mail(message_id="m1", sending_account_id="acct1", source="a@example.test"),
            bounce=ev.Bounce(bounce_type=ev.BOUNCE_TYPE_PERMANENT),
        ),
    )
    delivery = WebhookDelivery(id=7, destination_id=row.id, event_id=event.event_id, shape=EVENT)
    delivery.event = event.SerializeToString()
    first, again = (json.loads(subscriptions.request(row, delivery).body) for _ in range(2))
    assert first["Type"] == "Notification" and first["MessageId"] == again["MessageId"]
    assert first["Subject"] == EVENT_SUBJECT and json.loads(first["Message"])["eventType"] == "Bounce"
    assert parse_qs(urlsplit(first["UnsubscribeURL"]).query)["SubscriptionArn"] == [arn]
    assert _verifies(first, world.signer)
    delivery.shape = NOTIFICATION
    notification = json.loads(subscriptions.request(row, delivery).body)
    assert "Subject" not in notification
    assert json.loads(notification["Message"])["notificationType"] == "Bounce"

    assert not await subscriptions.unsubscribe(arn + "x")
    assert not await subscriptions.unsubscribe("no-colon")
    assert await subscriptions.unsubscribe(arn)
    assert not await subscriptions.unsubscribe(arn)  # that subscription no longer exists
    row, queued = await _state(world)
    assert row.subscription_status == PENDING_CONFIRMATION and row.subscription_id == ""
    assert [q.shape for q in queued] == [UNSUBSCRIBE]
    goodbye = json.loads(subscriptions.request(row, queued[0]).body)
    assert goodbye["Type"] == "UnsubscribeConfirmation" and _verifies(goodbye, world.signer)
    # Its SubscribeURL subscribes again, with a new SubscriptionArn; the account may confirm too.
    again_arn = await subscriptions.confirm(row.topic_arn, goodbye["Token"])
    assert again_arn is not None and again_arn != arn
    assert await subscriptions.confirm_destination("acct1", "app", "sns") == again_arn

    with pytest.raises(FailedPrecondition):
        await subscriptions.confirm_destination("acct1", "app", "json")
    for account, set_name, name in (
        ("acct2", "app", "sns"),
        ("acct1", "other", "sns"),
        ("acct1", "app", "x"),
    ):
        with pytest.raises(NotFound):
            await subscriptions.confirm_destination(account, set_name, name)


@pytest.fixture
def hostile(tmp_path: Path) -> Iterator[tuple[asyncio.Runner, World]]:
    """One world for every example: a pending subscription with its handshake sent."""
    with asyncio.Runner() as runner:
        world = runner.run(_world(f"sqlite+aiosqlite:///{tmp_path / 'hostile.db'}", tmp_path))
        runner.run(world.subscriptions.subscribe("acct1", "app", "sns"))
        yield runner, world


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(topic=st.text(max_size=300), token=st.text(max_size=300), arn=st.text(max_size=300))
def test_hostile_subscribe_and_unsubscribe_parameters_change_nothing(
    hostile: tuple[asyncio.Runner, World], topic: str, token: str, arn: str
) -> None:
    """Whatever a SubscribeURL or UnsubscribeURL carries, a pending subscription stays pending and its
    handshake stays queued, unless it carries that subscription's own token."""
    runner, world = hostile

    async def check() -> None:
        row, queued = await _state(world)
        for topic_arn in (topic, row.topic_arn):
            assert await world.subscriptions.confirm(topic_arn, token) is None
        assert not await world.subscriptions.unsubscribe(arn)
        assert not await world.subscriptions.unsubscribe(f"{row.topic_arn}:{arn}")
        after, still = await _state(world)
        assert after.subscription_status == PENDING_CONFIRMATION
        assert [q.id for q in still] == [q.id for q in queued]

    runner.run(check())


async def test_the_dispatcher_sends_a_pending_subscription_its_handshake_only(
    database_url: str, tmp_path: Path
) -> None:
    """Through the real dispatcher and HTTP: the SubscriptionConfirmation goes out; an event queued for
    the pending subscription is dropped, never posted; a handshake left for a destination since turned
    to JSON is dropped too."""
    from sqlalchemy import update

    from services.feedback.destinations.signing import SecretBox
    from services.feedback.destinations.webhooks import WebhookDispatcher, WebhookOutbox
    from tests.delivery_helpers import wait_until
    from tests.destinations_helpers import WebhookReceiver

    world = await _world(database_url, tmp_path)
    receiver = WebhookReceiver().start()
    async with db.transaction(world.sessions) as session:
        await session.execute(update(EventDestination).values(target=receiver.url))
    outbox = WebhookOutbox(
        world.sessions, Clock(), retry_period=dt.timedelta(hours=24), backoff=0.2, backoff_max=1.0
    )
    dispatcher = WebhookDispatcher(
        outbox, SecretBox.from_setting("", tmp_path), timeout=30, poll_seconds=0.1, allow_private=True
    )
    dispatcher.add_format("SNS", world.subscriptions.request)
    running = asyncio.create_task(dispatcher.run())
    try:
        await world.subscriptions.subscribe("acct1", "app", "sns")
        await wait_until(lambda: len(receiver.deliveries) >= 1, what="the handshake")
        assert json.loads(receiver.deliveries[0].body)["Type"] == "SubscriptionConfirmation"
        row, _ = await _state(world)
        event = new_event("acct1", email=ev.EmailEvent(event_type=ev.EMAIL_EVENT_TYPE_BOUNCE))
        await outbox.enqueue(row, event)
        dispatcher.wake()

        # Dropped, as SNS drops what a pending subscription would get.
        assert await _outbox_empties(world)

        await _stop(running)
        await world.subscriptions.subscribe("acct1", "app", "sns")  # a second handshake, queued
        async with db.transaction(world.sessions) as session:
            await session.execute(
                update(EventDestination)
                .where(EventDestination.name == "sns")
                .values(format="JSON", subscription_status=CONFIRMED)
            )
        running = asyncio.create_task(dispatcher.run())
        assert await _outbox_empties(world)
        assert len(receiver.deliveries) == 1  # the first handshake only
    finally:
        await _stop(running)
        receiver.stop()


async def _stop(task: asyncio.Task[None]) -> None:
    if not task.done():
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


async def _outbox_empties(world: World, within: float = 60.0) -> bool:
    for _ in range(int(within * 10)):
        if not (await _state(world))[1]:
            return True
        await asyncio.sleep(0.1)
    return False
