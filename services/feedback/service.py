"""The feedback service as the server bootstrap sees it."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
from collections.abc import Awaitable, Callable, Iterable
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
    IDENTITY_CHANGED_SUBJECT,
    email_event_subject,
)
from postmesh.common.tracking import TokenSigner, TrackedMail
from postmesh.events.v1 import events_pb2
from postmesh.feedback.v1 import feedback_pb2, feedback_pb2_grpc
from postmesh.identity.v1.identity_pb2 import GetIdentityNotificationAttributesRequest
from services.feedback.auto_suppression import AutoSuppression, parse_reasons
from services.feedback.configsets import ConfigurationSets
from services.feedback.destinations.notifications import NONE as NO_NOTIFICATIONS
from services.feedback.destinations.notifications import IdentityNotifications, NotificationSettings
from services.feedback.destinations.routing import EventRouter
from services.feedback.destinations.signing import SecretBox
from services.feedback.destinations.sns import SnsFormat, SnsSigner
from services.feedback.destinations.sns_http import SnsEndpoint
from services.feedback.destinations.sns_keys import load_or_create
from services.feedback.destinations.sns_subscriptions import SNS, SnsSubscriptions
from services.feedback.destinations.subscribers import MARK_EXISTING_SECONDS, SubscribedAccounts
from services.feedback.destinations.subscriptions import Subscriptions
from services.feedback.destinations.webhooks import WebhookDispatcher, WebhookOutbox
from services.feedback.event_consumer import FeedbackEvents, consume_feedback_events
from services.feedback.forwarding import FeedbackForwarder, notice_sender
from services.feedback.inbound.wiring import Inbound, feedback_loop_address
from services.feedback.models import Base
from services.feedback.servicer import FeedbackServicer
from services.feedback.suppression import SuppressionList
from services.feedback.suppression_io.jobs import (
    AccountSuppressionSettings,
    ExportJobs,
    ImportJobs,
    JobRunner,
)
from services.feedback.timeline.store import EventStore
from services.feedback.tracking.http import TrackingServer
from services.feedback.tracking.recorder import TrackingRecorder

# How often stored events past EVENT_RETENTION_DAYS, and finished jobs, are deleted.
HOUSEKEEPING_SECONDS = 3600.0


class FeedbackService(Service):
    name = "feedback"
    full_name = feedback_pb2.DESCRIPTOR.services_by_name["FeedbackService"].full_name
    access = {
        "CheckSuppressedDestinations": Access.INTERNAL,
        "ClassifyInboundMessage": Access.ADMIN,
        "ListInboundReports": Access.ADMIN,
        "GetInboundReport": Access.ADMIN,
        "RetryInboundReport": Access.ADMIN,
        "ListDeadLetters": Access.ADMIN,
        "ReplayDeadLetters": Access.ADMIN,
    }
    metadata = Base.metadata
    migrations_dir = Path(__file__).parent / "migrations"
    _identity_changes: Subscription | None = None
    _set_changes: Subscription | None = None

    inbound: Inbound | None = None

    def register(self, server: aio.Server) -> None:
        self.servicer = FeedbackServicer()
        feedback_pb2_grpc.add_FeedbackServiceServicer_to_server(self.servicer, server)
        self.tracking: TrackingServer | None = None
        # SNS-format destinations: the dispatcher builds messages with sns_format and answers the
        # endpoint's SubscribeURL and UnsubscribeURL by setting sns_endpoint.callbacks.
        self.sns_endpoint: SnsEndpoint | None = None
        self.sns_format: SnsFormat | None = None

    async def on_ready(self) -> None:
        runtime = self.runtime

        async def added(account_id: str) -> None:
            await runtime.events.publish(
                new_event(account_id, suppression_list_changed=events_pb2.SuppressionListChanged())
            )

        suppression = SuppressionList(runtime.sessions, runtime.clock, added=added)
        self.servicer.suppression = suppression
        events = EventStore(runtime.sessions, runtime.clock)
        self.servicer.events = events
        if runtime.settings.event_retention_days < 1:
            raise ValueError("EVENT_RETENTION_DAYS must be at least 1.")
        retention = dt.timedelta(days=runtime.settings.event_retention_days)
        settings = AccountSuppressionSettings(
            runtime.sessions, runtime.clock, parse_reasons(runtime.settings.suppression_reasons)
        )
        self.servicer.suppression_settings = settings
        runner = JobRunner()
        self.servicer.imports = ImportJobs(
            runtime.sessions,
            runtime.clock,
            suppression,
            runner,
            max_bytes=runtime.settings.suppression_import_max_bytes,
        )
        self.servicer.exports = ExportJobs(runtime.sessions, runtime.clock, suppression, runner)
        # Jobs run in the worker that took the request; the unfinished ones of a past run are resumed
        # by one worker only.
        runtime.spawn(lambda: runner.run_forever(resume=runtime.worker.primary), "suppression-jobs")
        feedback_subjects = [
            email_event_subject(events_pb2.EMAIL_EVENT_TYPE_BOUNCE),
            email_event_subject(events_pb2.EMAIL_EVENT_TYPE_COMPLAINT),
        ]
        # Every account may choose its reasons, so the consumer runs even when the default is none.
        auto = AutoSuppression(suppression, settings.reasons)
        runtime.spawn(
            lambda: consume_events(
                runtime.jetstream,
                durable="feedback-suppression",
                subjects=feedback_subjects,
                handle=auto.handle,
            ),
            "auto-suppression",
        )
        forwarder = FeedbackForwarder(
            js=runtime.jetstream,
            suppression=suppression,
            clock=runtime.clock,
            sender=notice_sender(runtime.settings),
            own_addresses={feedback_loop_address(runtime.settings)},
        )
        runtime.spawn(
            lambda: consume_events(
                runtime.jetstream,
                durable="feedback-forwarding",
                subjects=feedback_subjects,
                handle=forwarder.handle,
            ),
            "feedback-forwarding",
        )
        runtime.spawn_once(
            lambda: every(
                HOUSEKEEPING_SECONDS,
                lambda: events.expire(retention),
                self.servicer.imports.expire,
                self.servicer.exports.expire,
            ),
            "housekeeping",
        )
        await self._start_sns()
        router = await self._start_destinations()
        self.inbound = Inbound(runtime)
        self.servicer.inbound = self.inbound
        # The timeline, the sent index (whether or not the inbound listener runs: the Classify and
        # Retry RPCs use it too) and the router, fed by one durable consumer in every worker.
        steps = FeedbackEvents(timeline=events, sent=self.inbound.messages, router=router)
        runtime.spawn(lambda: consume_feedback_events(runtime.jetstream, steps), "feedback-events")
        await self.inbound.start()
        await self._start_tracking()

    async def _start_sns(self) -> None:
        settings = self.runtime.settings
        # Its subscription callbacks belong to the webhook dispatcher, which runs in one worker.
        if not settings.sns_https_listen or not self.runtime.worker.primary:
            return
        identity = load_or_create(
            host=settings.sns_cert_host,
            data_dir=Path(settings.data_dir),
            cert_file=settings.sns_cert_file,
            key_file=settings.sns_key_file,
        )
        self.sns_endpoint = SnsEndpoint(settings.sns_https_listen, identity)
        port = await self.sns_endpoint.start()
        base = (settings.sns_public_url or f"https://{settings.sns_cert_host}:{port}").rstrip("/")
        self.sns_format = SnsFormat(
            signer=SnsSigner(identity.private_key, base + self.sns_endpoint.cert_path), endpoint=base
        )

    async def _start_tracking(self) -> None:
        runtime = self.runtime
        settings = runtime.settings
        if not (settings.tracking_secret and settings.tracking_http_listen):
            return
        recorder = TrackingRecorder(
            signer=TokenSigner(settings.tracking_secret),
            events=runtime.events,
            mails=TrackedMail(runtime.jetstream, settings.tracking_retention_days),
            clock=runtime.clock,
        )
        self.tracking = TrackingServer(
            settings.tracking_http_listen,
            recorder,
            trust_forwarded_for=settings.tracking_trust_forwarded_for,
            reuse_port=runtime.worker.shares_ports,
        )
        await self.tracking.start()

    async def on_stop(self) -> None:
        for subscription in (self._identity_changes, self._set_changes):
            if subscription is not None:
                with contextlib.suppress(Exception):  # the connection may already be closing
                    await subscription.unsubscribe()
        if self.inbound is not None:
            await self.inbound.stop()
        if self.tracking is not None:
            await self.tracking.stop()
        if self.sns_endpoint is not None:
            await self.sns_endpoint.stop()

    async def _start_destinations(self) -> EventRouter:
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
        servicer.sns_subscriptions = None
        if self.sns_format is not None and self.sns_endpoint is not None:
            subscriptions = SnsSubscriptions(
                runtime.sessions,
                runtime.clock,
                sns=self.sns_format,
                region=settings.sns_region,
                changed=changed,
                queued=dispatcher.wake,
            )
            dispatcher.add_format(SNS, subscriptions.request)
            self.sns_endpoint.callbacks = subscriptions
            servicer.sns_subscriptions = subscriptions
        servicer.configuration_sets = sets
        servicer.secret_box = box
        servicer.outbox = outbox
        subscribers = SubscribedAccounts(runtime.jetstream)
        servicer.subscriptions = Subscriptions(
            runtime.jetstream,
            subscribers=subscribers,
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
            subscribers=subscribers,
        )

        async def forget_routes(_: Any) -> None:
            router.forget_routes()

        self._set_changes = await runtime.nats.subscribe(CONFIGURATION_SET_CHANGED_SUBJECT, cb=forget_routes)
        # One dispatcher per machine: two would post a destination's rows twice. Rows queued by the
        # other workers wait for its poll (WEBHOOK_POLL_SECONDS) instead of its wake-up.
        runtime.spawn_once(dispatcher.run, "webhook-dispatcher")
        # Subscriptions opened by a release that did not mark their accounts (during an upgrade).
        runtime.spawn_once(
            lambda: every(MARK_EXISTING_SECONDS, subscribers.mark_existing), "event-subscribers"
        )
        return router


def _own_endpoints(grpc_endpoints: Iterable[str], settings: Settings) -> list[str]:
    """Every host:port postmesh listens on that a webhook could be pointed at."""
    own = set(grpc_endpoints)
    if settings.metrics_port:
        own.add(f"{settings.grpc_listen.rpartition(':')[0] or '0.0.0.0'}:{settings.metrics_port}")
    for name in ("identity_http_listen", "tracking_http_listen", "sns_https_listen", "inbound_smtp_listen"):
        listen = str(getattr(settings, name, "") or "")
        if listen:
            own.add(listen)
    return sorted(own)


async def every(seconds: float, *chores: Callable[[], Awaitable[object]]) -> None:
    """Housekeeping: each chore now, then again every `seconds`."""
    while True:
        for chore in chores:
            await chore()
        await asyncio.sleep(seconds)


SERVICE = FeedbackService
