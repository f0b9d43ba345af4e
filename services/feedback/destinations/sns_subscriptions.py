"""SNS-format destinations' subscriptions: the handshake, confirmation and unsubscription, and the
messages the webhook dispatcher posts to them (no HTTP here: sns_http.py answers the URLs, webhooks.py
posts).

As with SNS: a new (or re-pointed) SNS destination is PENDING_CONFIRMATION and gets a signed
SubscriptionConfirmation first; nothing else goes to it, and the events of that time are not kept for
it, until its SubscribeURL is fetched (or the account confirms it: `confirm_destination`, for consumers
that fetch SubscribeURL only from AWS's host names). Its UnsubscribeURL ends the subscription: the
destination is pending again, gets an UnsubscribeConfirmation (whose SubscribeURL subscribes it again)
and nothing else.

The token is kept only as its SHA-256; the handshake row carries it to the endpoint, and is deleted once
delivered. The TopicArn is stable (the account, set and destination names), so a consumer may pin it.
"""

from __future__ import annotations

import hashlib
import json
import secrets
import uuid
from collections.abc import Awaitable, Callable

from sqlalchemy import ColumnElement, delete, select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from postmesh.common.db import transaction
from postmesh.common.errors import FailedPrecondition, NotFound
from postmesh.common.service import Clock
from postmesh.events.v1 import events_pb2 as ev
from services.feedback.configsets import CONFIRMED, PENDING_CONFIRMATION, WEBHOOK, not_found
from services.feedback.destinations import sesjson
from services.feedback.destinations.sns import SnsFormat, subscription_arn, topic_arn
from services.feedback.destinations.webhooks import (
    EVENT,
    NOTIFICATION_WITH_HEADERS,
    Request,
)
from services.feedback.models import ConfigurationSet, EventDestination, WebhookDelivery

SNS = "SNS"
# Webhook delivery shapes of the handshake messages: the row's `event` holds the token.
SUBSCRIBE = "sns-subscribe"
UNSUBSCRIBE = "sns-unsubscribe"
HANDSHAKES = (SUBSCRIBE, UNSUBSCRIBE)
# As SES's event publishing through SNS titles its notifications (identity notifications have none).
EVENT_SUBJECT = "Amazon SES Email Event Notification"
_MESSAGE_IDS = uuid.UUID("9b0c7e55-5d0b-4d43-9f1e-6b0f5e1c2a77")

Changed = Callable[[str, str], Awaitable[None]]


def _hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def destination_topic(region: str, account_id: str, set_name: str, name: str) -> str:
    return topic_arn(region, account_id, f"{set_name}-{name}")


def subscription_of(destination: EventDestination) -> str:
    """The destination's SubscriptionArn; empty while it is pending."""
    if not destination.subscription_id:
        return ""
    return subscription_arn(destination.topic_arn, destination.subscription_id)


async def _with_set(
    session: AsyncSession, *conditions: ColumnElement[bool]
) -> tuple[EventDestination, str] | None:
    """The SNS destination matching `conditions`, and its set's name."""
    found = (
        await session.execute(
            select(EventDestination, ConfigurationSet.name)
            .join(ConfigurationSet, ConfigurationSet.id == EventDestination.configuration_set_id)
            .where(EventDestination.format == SNS, *conditions)
        )
    ).first()
    return None if found is None else (found[0], found[1])


class SnsSubscriptions:
    """The subscriptions of SNS-format destinations; the SNS endpoint's SubscriptionCallbacks, and the
    dispatcher's formatter for them."""

    def __init__(
        self,
        sessions: async_sessionmaker[AsyncSession],
        clock: Clock,
        *,
        sns: SnsFormat,
        region: str,
        changed: Changed,
        queued: Callable[[], None],
    ) -> None:
        self._sessions = sessions
        self._clock = clock
        self._sns = sns
        self._region = region
        self._changed = changed
        self._queued = queued

    async def subscribe(self, account_id: str, set_name: str, name: str) -> None:
        """Starts the handshake of a pending SNS destination (just created, or re-pointed)."""
        async with transaction(self._sessions) as session:
            row = await self._find(session, account_id, set_name, name)
            if row.format != SNS or row.subscription_status != PENDING_CONFIRMATION:
                return
            row.topic_arn = destination_topic(self._region, account_id, set_name, name)
            row.subscription_id = ""
            await self._handshake(session, row, SUBSCRIBE)
        self._queued()

    async def confirm(self, topic_arn: str, token: str) -> str | None:
        """The SubscribeURL: confirms the pending subscription with this token (again: the same ARN)."""
        async with transaction(self._sessions) as session:
            found = await _with_set(
                session,
                EventDestination.topic_arn == topic_arn,
                EventDestination.subscription_token_hash == _hash(token),
            )
            if found is None:
                return None
            row, set_name = found
            arn = await self._confirmed(session, row)
        await self._changed(row.account_id, set_name)
        return arn

    async def confirm_destination(self, account_id: str, set_name: str, name: str) -> str:
        """The account confirms its own destination (the ConfirmConfigurationSetEventDestination RPC)."""
        async with transaction(self._sessions) as session:
            row = await self._find(session, account_id, set_name, name)
            if row.kind != WEBHOOK or row.format != SNS:
                raise FailedPrecondition(
                    f"Event destination {name} is not in the SNS format: it has no subscription to confirm.",
                    reason="NOT_SNS_FORMAT",
                )
            arn = await self._confirmed(session, row)
        await self._changed(account_id, set_name)
        return arn

    async def unsubscribe(self, subscription: str) -> bool:
        """The UnsubscribeURL: the destination is pending again and told so; False for an unknown ARN."""
        topic, _, subscription_id = subscription.rpartition(":")
        if not topic or not subscription_id:
            return False
        async with transaction(self._sessions) as session:
            found = await _with_set(
                session,
                EventDestination.topic_arn == topic,
                EventDestination.subscription_id == subscription_id,
                EventDestination.subscription_status == CONFIRMED,
            )
            if found is None:
                return False
            row, set_name = found
            row.subscription_status = PENDING_CONFIRMATION
            row.subscription_id = ""
            # What waited for it is dropped, as SNS drops it for a deleted subscription.
            await session.execute(delete(WebhookDelivery).where(WebhookDelivery.destination_id == row.id))
            await self._handshake(session, row, UNSUBSCRIBE)
        await self._changed(row.account_id, set_name)
        self._queued()
        return True

    async def _confirmed(self, session: AsyncSession, row: EventDestination) -> str:
        if row.subscription_status != CONFIRMED or not row.subscription_id:
            row.subscription_status = CONFIRMED
            row.subscription_id = str(uuid.uuid4())
        # A handshake not yet delivered has nothing left to say.
        await session.execute(
            delete(WebhookDelivery).where(
                WebhookDelivery.destination_id == row.id, WebhookDelivery.shape.in_(HANDSHAKES)
            )
        )
        return subscription_of(row)

    async def _handshake(self, session: AsyncSession, row: EventDestination, shape: str) -> None:
        token = secrets.token_hex(32)
        row.subscription_token_hash = _hash(token)
        now = self._clock.now()
        await session.execute(
            delete(WebhookDelivery).where(
                WebhookDelivery.destination_id == row.id, WebhookDelivery.shape.in_(HANDSHAKES)
            )
        )
        session.add(
            WebhookDelivery(
                destination_id=row.id,
                account_id=row.account_id,
                event_id=f"{shape}:{row.subscription_token_hash[:32]}",
                shape=shape,
                event=token.encode(),
                dead=False,
                attempts=0,
                last_error="",
                first_attempt_at=now,
                next_attempt_at=now,
            )
        )

    async def _find(
        self, session: AsyncSession, account_id: str, set_name: str, name: str
    ) -> EventDestination:
        owner = await session.scalar(
            select(ConfigurationSet.id).where(
                ConfigurationSet.account_id == account_id, ConfigurationSet.name == set_name
            )
        )
        if owner is None:
            raise not_found(set_name)
        row = await session.scalar(
            select(EventDestination).where(
                EventDestination.configuration_set_id == owner, EventDestination.name == name
            )
        )
        if row is None:
            raise NotFound(f"Event destination {name} does not exist in configuration set {set_name}.")
        return row

    # --- the dispatcher's formatter

    def request(self, destination: EventDestination, row: WebhookDelivery) -> Request:
        version = destination.signature_version or 1
        if row.shape in HANDSHAKES:
            build = (
                self._sns.subscription_confirmation
                if row.shape == SUBSCRIBE
                else self._sns.unsubscribe_confirmation
            )
            message = build(topic=destination.topic_arn, token=row.event.decode(), signature_version=version)
        else:
            event = ev.Event.FromString(row.event)
            if row.shape == EVENT:
                text, subject = sesjson.event_json(event), EVENT_SUBJECT
            else:
                record = sesjson.notification_record(
                    event, include_headers=row.shape == NOTIFICATION_WITH_HEADERS
                )
                text, subject = json.dumps(record, separators=(",", ":"), ensure_ascii=False), ""
            message = self._sns.notification(
                topic=destination.topic_arn,
                subscription=subscription_of(destination),
                message=text,
                subject=subject or None,
                signature_version=version,
                # The same MessageId on every attempt, as SNS retries.
                message_id=str(uuid.uuid5(_MESSAGE_IDS, f"{destination.id}/{row.event_id}")),
            )
        return Request(body=message.json(), headers=message.headers)
