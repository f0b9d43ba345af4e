"""The feedback service as the server bootstrap sees it."""

from __future__ import annotations

import contextlib
import datetime as dt
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from grpc import aio
from nats.aio.subscription import Subscription

import services.feedback.settings  # noqa: F401 - registers the service's settings
from postmesh.common.auth import Access
from postmesh.common.bus import consume_events, new_event
from postmesh.common.clients import for_account
from postmesh.common.config import Settings
from postmesh.common.service import Service
from postmesh.common.streams import (
    CONFIGURATION_SET_CHANGED_SUBJECT,
    EMAIL_EVENTS_SUBJECT,
    IDENTITY_CHANGED_SUBJECT,
    email_event_subject,
)
from postmesh.events.v1 import events_pb2
from postmesh.feedback.v1 import feedback_pb2, feedback_pb2_grpc
from postmesh.identity.v1.identity_pb2 import GetIdentityNotificationAttributesRequest
from services.feedback.auto_suppression import AutoSuppression, parse_reasons
from services.feedback.configsets import ConfigurationSets
from services.feedback.destinations.notifications import NONE as NO_NOTIFICATIONS
from services.feedback.destinations.notifications import IdentityNotifications, NotificationSettings
from services.feedback.destinations.routing import EventRouter
from services.feedback.destinations.signing import SecretBox
from services.feedback.destinations.subscriptions import Subscriptions
from services.feedback.destinations.webhooks import WebhookDispatcher, WebhookOutbox
from services.feedback.models import Base
from services.feedback.servicer import FeedbackServicer
from services.feedback.suppression import SuppressionList


class FeedbackService(Service):
    name = "feedback"
    full_name = feedback_pb2.DESCRIPTOR.services_by_name["FeedbackService"].full_name
    access = {
        "CheckSuppressedDestinations": Access.INTERNAL,
        "ListDeadLetters": Access.ADMIN,
        "ReplayDeadLetters": Access.ADMIN,
    }
    metadata = Base.metadata
    migrations_dir = Path(__file__).parent / "migrations"
    _identity_changes: Subscription | None = None
    _set_changes: Subscription | None = None

    def register(self, server: aio.Server) -> None:
        self.servicer = FeedbackServicer()
        feedback_pb2_grpc.add_FeedbackServiceServicer_to_server(self.servicer, server)

    async def on_ready(self) -> None:
        runtime = self.runtime
        suppression = SuppressionList(runtime.sessions, runtime.clock)
        self.servicer.suppression = suppression
        await self._start_destinations()
        reasons = parse_reasons(runtime.settings.suppression_reasons)
        if reasons:
            auto = AutoSuppression(suppression, reasons)
            runtime.spawn(
                lambda: consume_events(
                    runtime.jetstream,
                    durable="feedback-suppression",
                    subjects=[
                        email_event_subject(events_pb2.EMAIL_EVENT_TYPE_BOUNCE),
                        email_event_subject(events_pb2.EMAIL_EVENT_TYPE_COMPLAINT),
                    ],
                    handle=auto.handle,
                ),
                "auto-suppression",
            )

    async def _start_destinations(self) -> None:
        runtime = self.runtime
        settings = runtime.settings
        servicer = self.servicer

        async def changed(account_id: str, name: str) -> None:
            await runtime.events.publish(
                new_event(
                    account_id,
                    configuration_set_changed=events_pb2.ConfigurationSetChanged(configuration_set_name=name),
                )
            )

        sets = ConfigurationSets(
            runtime.sessions,
            runtime.clock,
            changed=changed,
            max_destinations=settings.event_destinations_per_set,
        )
        box = SecretBox.from_setting(settings.webhook_secrets_key, Path(settings.data_dir))
        outbox = WebhookOutbox(
            runtime.sessions,
            runtime.clock,
            retry_period=dt.timedelta(hours=settings.webhook_retry_hours),
            backoff=settings.webhook_backoff_seconds,
            backoff_max=settings.webhook_backoff_max_seconds,
        )
        dispatcher = WebhookDispatcher(
            outbox,
            box,
            timeout=settings.webhook_timeout_seconds,
            poll_seconds=settings.webhook_poll_seconds,
            allow_private=settings.webhook_allow_private_targets,
        )
        servicer.configuration_sets = sets
        servicer.secret_box = box
        servicer.outbox = outbox
        servicer.subscriptions = Subscriptions(
            runtime.jetstream,
            max_unacked=settings.event_subscription_max_unacked,
            ack_wait=settings.event_subscription_ack_wait_seconds,
        )
        servicer.webhook_formats = dispatcher.formats
        servicer.allow_private_targets = settings.webhook_allow_private_targets
        servicer.own_endpoints = _own_endpoints(runtime.clients.endpoints.values(), settings)
        servicer.nats_prefix = settings.user_nats_subject_prefix
        assert runtime.nats is not None

        async def notification_settings(account_id: str, identity: str) -> NotificationSettings:
            reply = await runtime.clients.identity.GetIdentityNotificationAttributes(
                GetIdentityNotificationAttributesRequest(identities=[identity]),
                metadata=for_account(account_id),
                timeout=10.0,
            )
            found = reply.notification_attributes.get(identity)
            if found is None:
                return NO_NOTIFICATIONS
            return NotificationSettings(
                destinations={
                    events_pb2.EMAIL_EVENT_TYPE_BOUNCE: found.bounce_destination,
                    events_pb2.EMAIL_EVENT_TYPE_COMPLAINT: found.complaint_destination,
                    events_pb2.EMAIL_EVENT_TYPE_DELIVERY: found.delivery_destination,
                },
                headers={
                    events_pb2.EMAIL_EVENT_TYPE_BOUNCE: found.headers_in_bounce_notifications_enabled,
                    events_pb2.EMAIL_EVENT_TYPE_COMPLAINT: found.headers_in_complaint_notifications_enabled,
                    events_pb2.EMAIL_EVENT_TYPE_DELIVERY: found.headers_in_delivery_notifications_enabled,
                },
            )

        notifications = IdentityNotifications(notification_settings)

        async def forget(_: Any) -> None:
            notifications.forget()

        self._identity_changes = await runtime.nats.subscribe(IDENTITY_CHANGED_SUBJECT, cb=forget)
        router = EventRouter(
            js=runtime.jetstream,
            nats=runtime.nats,
            sets=sets,
            outbox=outbox,
            subject_prefix=settings.user_nats_subject_prefix,
            queued=dispatcher.wake,
            notifications=notifications,
        )

        async def forget_routes(_: Any) -> None:
            router.forget_routes()

        self._set_changes = await runtime.nats.subscribe(CONFIGURATION_SET_CHANGED_SUBJECT, cb=forget_routes)
        runtime.spawn(
            lambda: consume_events(
                runtime.jetstream,
                durable="feedback-destinations",
                subjects=[EMAIL_EVENTS_SUBJECT],
                handle=router.handle,
            ),
            "event-routing",
        )
        runtime.spawn(dispatcher.run, "webhook-dispatcher")

    async def on_stop(self) -> None:
        for subscription in (self._identity_changes, self._set_changes):
            if subscription is not None:
                with contextlib.suppress(Exception):  # the connection may already be closing
                    await subscription.unsubscribe()


def _own_endpoints(grpc_endpoints: Iterable[str], settings: Settings) -> list[str]:
    """Every host:port postmesh listens on that a webhook could be pointed at."""
    own = set(grpc_endpoints)
    if settings.metrics_port:
        own.add(f"{settings.grpc_listen.rpartition(':')[0] or '0.0.0.0'}:{settings.metrics_port}")
    for name in ("identity_http_listen", "tracking_http_listen"):
        listen = str(getattr(settings, name, "") or "")
        if listen:
            own.add(listen)
    return sorted(own)


SERVICE = FeedbackService
