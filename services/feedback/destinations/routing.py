"""Every email event, routed: to the account's own event stream when the account has a SubscribeEvents
subscription, and to the enabled destinations of its configuration set that match its type (webhook
outbox rows, NATS subjects).

Events reach here at least once, a batch at a time (a durable JetStream consumer): `publish` puts the
batch's events of subscribed accounts on the account stream, then `route` takes each event on. Each step
is idempotent: the account stream de-duplicates by event id, the outbox keeps one row per destination
and event. A NATS subject destination is plain NATS (at most once for its subscribers, as core NATS is).
"""

from __future__ import annotations

import time
from collections.abc import Callable

from nats.aio.client import Client as NATS
from nats.js import JetStreamContext

from postmesh.common import jspublish
from postmesh.common.streams import account_events_subject
from postmesh.events.v1 import events_pb2 as ev
from services.feedback.configsets import CONFIRMED, WEBHOOK, ConfigurationSets
from services.feedback.configsets import NATS as NATS_KIND
from services.feedback.destinations import sesjson
from services.feedback.destinations.notifications import IdentityNotifications
from services.feedback.destinations.subscribers import SubscribedAccounts
from services.feedback.destinations.targets import full_subject
from services.feedback.destinations.webhooks import NOTIFICATION, NOTIFICATION_WITH_HEADERS, WebhookOutbox
from services.feedback.models import EventDestination

# Kept routes also expire, in case a change event was missed while NATS reconnected.
_ROUTES_SECONDS = 30.0
_ROUTES_LIMIT = 10_000


class EventRouter:
    def __init__(
        self,
        *,
        js: JetStreamContext,
        nats: NATS,
        sets: ConfigurationSets,
        outbox: WebhookOutbox,
        subject_prefix: str,
        queued: Callable[[], None],
        notifications: IdentityNotifications,
        subscribers: SubscribedAccounts,
    ) -> None:
        self._js = js
        self._subscribers = subscribers
        self._nats = nats
        self._sets = sets
        self._outbox = outbox
        self._prefix = subject_prefix
        self._queued = queued
        self._notifications = notifications
        # The enabled destinations of each (account, set), until a ConfigurationSetChanged event.
        self._routes: dict[tuple[str, str], tuple[float, list[EventDestination]]] = {}

    def forget_routes(self) -> None:
        self._routes.clear()

    async def _destinations(self, account_id: str, set_name: str) -> list[EventDestination]:
        now = time.monotonic()
        kept = self._routes.get((account_id, set_name))
        if kept is not None and kept[0] > now:
            return kept[1]
        routes = await self._sets.routes(account_id, set_name)
        if len(self._routes) >= _ROUTES_LIMIT:
            self._routes.clear()
        self._routes[(account_id, set_name)] = (now + _ROUTES_SECONDS, routes)
        return routes

    async def publish(self, events: list[ev.Event]) -> None:
        """Puts each email event of a subscribed account on its account's stream (SubscribeEvents),
        every publish in flight at once: a batch waits for the slowest acknowledgement instead of the
        sum of them. They are written in the batch's order. Raises the first failure once all are
        answered; the ones that went through are de-duplicated by event id when they are published
        again. The subscribed accounts are as the bucket held them at most a second before (see
        subscribers.py): a subscription opened before an event was published gets it."""
        routed = _routed(events)
        if not routed:
            return
        subscribed = await self._subscribers.current()
        copies = [
            (
                account_events_subject(event.account_id, event.email.event_type),
                event.SerializeToString(),
                {"Nats-Msg-Id": event.event_id},
            )
            for event in routed
            if event.account_id in subscribed
        ]
        if copies:
            await jspublish.publish_all(self._js, copies)

    async def route(self, event: ev.Event) -> None:
        """An event already on its account's stream, to its set's destinations and its identity's
        notification topics."""
        if not _routed([event]):
            return
        set_name = event.email.mail.configuration_set_name
        if set_name:
            await self._route_to_set(event, set_name)
        # Last: a failure here (the identity service unreachable) retries the event, and what was
        # queued above is not queued twice.
        await self._notify_identity(event)

    async def _route_to_set(self, event: ev.Event, set_name: str) -> None:
        email = event.email
        type_name = sesjson.API_NAMES.get(email.event_type, "")
        for destination in await self._destinations(event.account_id, set_name):
            if type_name not in destination.event_types.split(","):
                continue
            if destination.kind == WEBHOOK:
                if destination.subscription_status != CONFIRMED:
                    continue  # an SNS subscription not yet confirmed gets nothing, as with SNS
                await self._outbox.enqueue(destination, event)
                self._queued()
            elif destination.kind == NATS_KIND:
                payload = (
                    event.SerializeToString()
                    if destination.format == "PROTOBUF"
                    else sesjson.event_json(event).encode()
                )
                await self._nats.publish(
                    full_subject(self._prefix, event.account_id, destination.target),
                    payload,
                    headers={"Nats-Msg-Id": event.event_id},
                )

    async def _notify_identity(self, event: ev.Event) -> None:
        target = await self._notifications.target(event)
        if target is None:
            return
        path, headers = target
        set_name, _, name = path.partition("/")
        destination = await self._sets.webhook(event.account_id, set_name, name)
        if destination is not None and destination.subscription_status == CONFIRMED:
            await self._outbox.enqueue(
                destination, event, NOTIFICATION_WITH_HEADERS if headers else NOTIFICATION
            )
            self._queued()


def _routed(events: list[ev.Event]) -> list[ev.Event]:
    """The events this router handles: email events of an account."""
    return [e for e in events if e.WhichOneof("payload") == "email" and e.account_id]
