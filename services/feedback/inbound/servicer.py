"""gRPC surface of the inbound side: the operator's dry run and the kept reports (thin: decode, call
the processor, encode)."""

from __future__ import annotations

from grpc import aio

from postmesh.common.errors import InvalidArgument, Unavailable
from postmesh.common.protoutil import timestamp
from postmesh.feedback.v1 import feedback_pb2_grpc
from postmesh.feedback.v1 import inbound_pb2 as pb
from services.feedback.inbound.processing import Outcome, recipient_class
from services.feedback.inbound.report import Kind
from services.feedback.inbound.wiring import Inbound
from services.feedback.models import KeptReport

_KINDS = {
    Kind.BOUNCE: pb.INBOUND_KIND_BOUNCE,
    Kind.COMPLAINT: pb.INBOUND_KIND_COMPLAINT,
    Kind.NONE: pb.INBOUND_KIND_NONE,
}


def classification(outcome: Outcome) -> pb.InboundClassification:
    report, mapping = outcome.report, outcome.mapping
    recipients = []
    # Mapped: the recipients of the message the report names; else all the report names.
    for recipient in mapping.recipients if mapping.mapped else report.recipients:
        entry = pb.InboundRecipient(
            email_address=recipient.address,
            action=recipient.action,
            status=recipient.status,
            diagnostic_code=recipient.diagnostic_code,
        )
        if report.kind is Kind.BOUNCE:
            klass = recipient_class(report, recipient)
            entry.bounce_type, entry.bounce_sub_type = klass.bounce_type, klass.bounce_sub_type
        recipients.append(entry)
    result = pb.InboundClassification(
        kind=_KINDS[report.kind],
        format=report.format,
        recipients=recipients,
        feedback_type=report.feedback_type,
        user_agent=report.user_agent,
        reporting_mta=report.reporting_mta,
        message_id=mapping.mail.message_id if mapping.mail is not None else "",
        account_id=mapping.account_id,
        mapping=mapping.how,
        reason=outcome.reason,
        events=outcome.events,
    )
    if report.arrival_date is not None:
        result.arrival_date.FromDatetime(report.arrival_date)
    return result


def kept_message(row: KeptReport) -> pb.KeptInboundReport:
    return pb.KeptInboundReport(
        report_id=row.id,
        receive_time=timestamp(row.received_at),
        mail_from=row.mail_from,
        rcpt_to=[r for r in row.rcpt_to.split("\n") if r],
        format=row.format,
        reason=row.reason,
        size_bytes=len(row.raw),
    )


class InboundAdminServicer(feedback_pb2_grpc.FeedbackServiceServicer):
    # Bound in FeedbackService.on_ready.
    inbound: Inbound | None = None

    def _inbound(self) -> Inbound:
        if self.inbound is None:
            raise Unavailable("The feedback service's inbound side is not ready yet.")
        return self.inbound

    async def ClassifyInboundMessage(
        self, request: pb.ClassifyInboundMessageRequest, context: aio.ServicerContext
    ) -> pb.ClassifyInboundMessageResponse:
        if not request.raw.strip():
            raise InvalidArgument("raw must hold the message to classify.", field="raw")
        outcome = await self._inbound().processor.classify(
            request.raw, request.mail_from, list(request.rcpt_to)
        )
        return pb.ClassifyInboundMessageResponse(classification=classification(outcome))

    async def ListInboundReports(
        self, request: pb.ListInboundReportsRequest, context: aio.ServicerContext
    ) -> pb.ListInboundReportsResponse:
        rows, token = await self._inbound().kept.list(request.page_size, request.page_token)
        return pb.ListInboundReportsResponse(reports=[kept_message(r) for r in rows], next_page_token=token)

    async def GetInboundReport(
        self, request: pb.GetInboundReportRequest, context: aio.ServicerContext
    ) -> pb.GetInboundReportResponse:
        inbound = self._inbound()
        row = await inbound.kept.get(request.report_id)
        outcome = await inbound.processor.classify(
            row.raw, row.mail_from, [r for r in row.rcpt_to.split("\n") if r]
        )
        return pb.GetInboundReportResponse(
            report=kept_message(row), raw=row.raw, classification=classification(outcome)
        )

    async def RetryInboundReport(
        self, request: pb.RetryInboundReportRequest, context: aio.ServicerContext
    ) -> pb.RetryInboundReportResponse:
        outcome = await self._inbound().processor.retry(request.report_id)
        return pb.RetryInboundReportResponse(
            recorded=bool(outcome.events) and not outcome.kept_id, classification=classification(outcome)
        )
