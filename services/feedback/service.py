"""The feedback service as the server bootstrap sees it."""

from __future__ import annotations

from pathlib import Path

from grpc import aio

import services.feedback.settings  # noqa: F401 - registers the service's settings
from postmesh.common.auth import Access
from postmesh.common.bus import consume_events
from postmesh.common.service import Service
from postmesh.common.streams import email_event_subject
from postmesh.events.v1 import events_pb2
from postmesh.feedback.v1 import feedback_pb2, feedback_pb2_grpc
from services.feedback.auto_suppression import AutoSuppression, parse_reasons
from services.feedback.forwarding import FeedbackForwarder, notice_sender
from services.feedback.inbound.wiring import Inbound, feedback_loop_address
from services.feedback.models import Base
from services.feedback.servicer import FeedbackServicer
from services.feedback.suppression import SuppressionList


class FeedbackService(Service):
    name = "feedback"
    full_name = feedback_pb2.DESCRIPTOR.services_by_name["FeedbackService"].full_name
    access = {
        "CheckSuppressedDestinations": Access.INTERNAL,
        "ClassifyInboundMessage": Access.ADMIN,
        "ListInboundReports": Access.ADMIN,
        "GetInboundReport": Access.ADMIN,
        "RetryInboundReport": Access.ADMIN,
    }
    metadata = Base.metadata
    migrations_dir = Path(__file__).parent / "migrations"

    inbound: Inbound | None = None

    def register(self, server: aio.Server) -> None:
        self.servicer = FeedbackServicer()
        feedback_pb2_grpc.add_FeedbackServiceServicer_to_server(self.servicer, server)

    async def on_ready(self) -> None:
        runtime = self.runtime
        suppression = SuppressionList(runtime.sessions, runtime.clock)
        self.servicer.suppression = suppression
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
                subjects=[
                    email_event_subject(events_pb2.EMAIL_EVENT_TYPE_BOUNCE),
                    email_event_subject(events_pb2.EMAIL_EVENT_TYPE_COMPLAINT),
                ],
                handle=forwarder.handle,
            ),
            "feedback-forwarding",
        )
        self.inbound = Inbound(runtime)
        self.servicer.inbound = self.inbound
        await self.inbound.start()

    async def on_stop(self) -> None:
        if self.inbound is not None:
            await self.inbound.stop()


SERVICE = FeedbackService
