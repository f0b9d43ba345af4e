"""gRPC surface of the feedback service."""

from __future__ import annotations

from grpc import aio

from postmesh.common.auth import account_for_internal_call, caller_account_id
from postmesh.common.protoutil import from_timestamp, timestamp
from postmesh.feedback.v1 import feedback_pb2 as pb
from postmesh.feedback.v1 import feedback_pb2_grpc
from services.feedback.inbound.servicer import InboundAdminServicer
from services.feedback.models import SuppressedDestination
from services.feedback.servicer_configsets import ConfigurationSetsServicer
from services.feedback.suppression import SuppressionList
from services.feedback.suppression_io.servicer import SuppressionJobRpcs
from services.feedback.timeline.servicer import TimelineRpcs

_REASON_PREFIX = "SUPPRESSION_LIST_REASON_"


def _reason_name(value: pb.SuppressionListReason.ValueType) -> str:
    return pb.SuppressionListReason.Name(value).removeprefix(_REASON_PREFIX)


def suppressed_message(row: SuppressedDestination) -> pb.SuppressedDestination:
    return pb.SuppressedDestination(
        email_address=row.email_address,
        reason=pb.SuppressionListReason.Value(_REASON_PREFIX + row.reason),
        last_update_time=timestamp(row.updated_at),
        message_id=row.message_id,
        feedback_id=row.feedback_id,
    )


class FeedbackServicer(
    TimelineRpcs,
    SuppressionJobRpcs,
    InboundAdminServicer,
    ConfigurationSetsServicer,
    feedback_pb2_grpc.FeedbackServiceServicer,
):
    # Bound in FeedbackService.on_ready.
    suppression: SuppressionList

    async def PutSuppressedDestination(
        self, request: pb.PutSuppressedDestinationRequest, context: aio.ServicerContext
    ) -> pb.PutSuppressedDestinationResponse:
        await self.suppression.put(caller_account_id(), request.email_address, _reason_name(request.reason))
        return pb.PutSuppressedDestinationResponse()

    async def GetSuppressedDestination(
        self, request: pb.GetSuppressedDestinationRequest, context: aio.ServicerContext
    ) -> pb.GetSuppressedDestinationResponse:
        row = await self.suppression.get(caller_account_id(), request.email_address)
        return pb.GetSuppressedDestinationResponse(suppressed_destination=suppressed_message(row))

    async def DeleteSuppressedDestination(
        self, request: pb.DeleteSuppressedDestinationRequest, context: aio.ServicerContext
    ) -> pb.DeleteSuppressedDestinationResponse:
        await self.suppression.delete(caller_account_id(), request.email_address)
        return pb.DeleteSuppressedDestinationResponse()

    async def ListSuppressedDestinations(
        self, request: pb.ListSuppressedDestinationsRequest, context: aio.ServicerContext
    ) -> pb.ListSuppressedDestinationsResponse:
        rows, token = await self.suppression.list(
            caller_account_id(),
            [_reason_name(r) for r in request.reasons],
            from_timestamp(request.start_date),
            from_timestamp(request.end_date),
            request.page_size,
            request.page_token,
        )
        summaries = [
            pb.SuppressedDestinationSummary(
                email_address=r.email_address,
                reason=pb.SuppressionListReason.Value(_REASON_PREFIX + r.reason),
                last_update_time=timestamp(r.updated_at),
            )
            for r in rows
        ]
        return pb.ListSuppressedDestinationsResponse(
            suppressed_destination_summaries=summaries, next_page_token=token
        )

    async def CheckSuppressedDestinations(
        self, request: pb.CheckSuppressedDestinationsRequest, context: aio.ServicerContext
    ) -> pb.CheckSuppressedDestinationsResponse:
        account_id = account_for_internal_call(request.account_id)
        rows = await self.suppression.check(account_id, list(request.email_addresses))
        return pb.CheckSuppressedDestinationsResponse(
            suppressed=[suppressed_message(r) for r in rows],
            list_empty=not rows and await self.suppression.is_empty(account_id),
        )
