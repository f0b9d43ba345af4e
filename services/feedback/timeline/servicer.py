"""gRPC surface of the events store: GetMessageInsights and ListEmailEvents."""

from __future__ import annotations

from grpc import aio

from postmesh.common.auth import caller_account_id
from postmesh.common.protoutil import from_timestamp
from postmesh.feedback.v1 import feedback_pb2 as pb
from services.feedback.timeline.store import EventFilter, EventStore


class TimelineRpcs:
    """Mixed into FeedbackServicer."""

    # Bound in FeedbackService.on_ready.
    events: EventStore

    async def GetMessageInsights(
        self, request: pb.GetMessageInsightsRequest, context: aio.ServicerContext
    ) -> pb.GetMessageInsightsResponse:
        timeline = await self.events.timeline(caller_account_id(), request.message_id)
        mail = timeline.mail
        return pb.GetMessageInsightsResponse(
            message_id=timeline.message_id,
            from_email_address=mail.source,
            subject=mail.subject,
            email_tags=mail.tags,
            events=timeline.events,
        )

    async def ListEmailEvents(
        self, request: pb.ListEmailEventsRequest, context: aio.ServicerContext
    ) -> pb.ListEmailEventsResponse:
        wanted = EventFilter(
            event_types=list(request.event_types),
            recipient=request.recipient,
            start=from_timestamp(request.start_time),
            end=from_timestamp(request.end_time),
            message_id=request.message_id,
        )
        events, token = await self.events.list(
            caller_account_id(), wanted, request.page_size, request.page_token
        )
        return pb.ListEmailEventsResponse(events=events, next_page_token=token)
