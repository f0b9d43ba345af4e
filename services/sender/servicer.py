"""gRPC surface of the sender service."""

from __future__ import annotations

from collections.abc import Sequence

from grpc import aio

from postmesh.common.auth import caller_account_id
from postmesh.common.protoutil import timestamp
from postmesh.sender.v1 import sender_pb2 as pb
from postmesh.sender.v1 import sender_pb2_grpc
from services.sender.accept import (
    Acceptor,
    BulkEntry,
    BulkRequest,
    Destination,
    Envelope,
    SendRequest,
    TemplateRef,
    fingerprint,
)
from services.sender.filtration.servicer import FiltrationServicer
from services.sender.mime import Body, Header
from services.sender.templates import TemplateContent, TemplateStore


def _content(message: pb.EmailTemplateContent) -> TemplateContent:
    return TemplateContent(subject=message.subject, text=message.text, html=message.html)


def _headers(headers: Sequence[pb.MessageHeader]) -> list[Header]:
    return [Header(h.name, h.value) for h in headers]


def _tags(tags: Sequence[pb.MessageTag]) -> list[tuple[str, str]]:
    return [(t.name, t.value) for t in tags]


def _destination(destination: pb.Destination) -> Destination:
    return Destination(
        list(destination.to_addresses), list(destination.cc_addresses), list(destination.bcc_addresses)
    )


def _fingerprint(request: pb.SendEmailRequest | pb.SendBulkEmailRequest) -> str:
    if not request.request_id:
        return ""
    return fingerprint(request.SerializeToString(deterministic=True))


def _template(template: pb.Template) -> TemplateRef:
    return TemplateRef(template.template_name, template.template_data, _headers(template.headers))


def _send_request(request: pb.SendEmailRequest) -> SendRequest:
    envelope = Envelope(
        from_email_address=request.from_email_address,
        from_identity=request.from_email_address_identity_arn,
        reply_to=list(request.reply_to_addresses),
        feedback_address=request.feedback_forwarding_email_address,
        feedback_identity=request.feedback_forwarding_email_address_identity_arn,
        configuration_set=request.configuration_set_name,
        request_id=request.request_id,
        fingerprint=_fingerprint(request),
    )
    common = {
        "envelope": envelope,
        "destination": _destination(request.destination),
        "tags": _tags(request.email_tags),
    }
    kind = request.content.WhichOneof("content")
    if kind == "simple":
        simple = request.content.simple
        body = simple.body
        charset = body.text.charset or body.html.charset or simple.subject.charset or "UTF-8"
        return SendRequest(
            **common,  # type: ignore[arg-type]
            simple=Body(
                simple.subject.data, body.text.data, body.html.data, charset, _headers(simple.headers)
            ),
        )
    if kind == "raw":
        return SendRequest(**common, raw=request.content.raw.data)  # type: ignore[arg-type]
    if kind == "template":
        return SendRequest(**common, template=_template(request.content.template))  # type: ignore[arg-type]
    return SendRequest(**common)  # type: ignore[arg-type]


def _bulk_request(request: pb.SendBulkEmailRequest) -> BulkRequest:
    envelope = Envelope(
        from_email_address=request.from_email_address,
        from_identity=request.from_email_address_identity_arn,
        reply_to=list(request.reply_to_addresses),
        feedback_address=request.feedback_forwarding_email_address,
        feedback_identity=request.feedback_forwarding_email_address_identity_arn,
        configuration_set=request.configuration_set_name,
        request_id=request.request_id,
        fingerprint=_fingerprint(request),
    )
    entries = [
        BulkEntry(
            _destination(e.destination),
            e.replacement_email_content.replacement_template.replacement_template_data,
            _tags(e.replacement_tags),
            _headers(e.replacement_headers),
        )
        for e in request.bulk_email_entries
    ]
    return BulkRequest(
        envelope, _template(request.default_content.template), entries, _tags(request.default_email_tags)
    )


class SenderServicer(FiltrationServicer, sender_pb2_grpc.SenderServiceServicer):
    # Bound in SenderService.on_ready.
    templates: TemplateStore
    acceptor: Acceptor

    async def CreateEmailTemplate(
        self, request: pb.CreateEmailTemplateRequest, context: aio.ServicerContext
    ) -> pb.CreateEmailTemplateResponse:
        await self.templates.create(
            caller_account_id(), request.template_name, _content(request.template_content)
        )
        return pb.CreateEmailTemplateResponse()

    async def GetEmailTemplate(
        self, request: pb.GetEmailTemplateRequest, context: aio.ServicerContext
    ) -> pb.GetEmailTemplateResponse:
        row = await self.templates.get(caller_account_id(), request.template_name)
        return pb.GetEmailTemplateResponse(
            template_name=row.name,
            template_content=pb.EmailTemplateContent(subject=row.subject, text=row.text, html=row.html),
        )

    async def UpdateEmailTemplate(
        self, request: pb.UpdateEmailTemplateRequest, context: aio.ServicerContext
    ) -> pb.UpdateEmailTemplateResponse:
        await self.templates.update(
            caller_account_id(), request.template_name, _content(request.template_content)
        )
        return pb.UpdateEmailTemplateResponse()

    async def DeleteEmailTemplate(
        self, request: pb.DeleteEmailTemplateRequest, context: aio.ServicerContext
    ) -> pb.DeleteEmailTemplateResponse:
        await self.templates.delete(caller_account_id(), request.template_name)
        return pb.DeleteEmailTemplateResponse()

    async def ListEmailTemplates(
        self, request: pb.ListEmailTemplatesRequest, context: aio.ServicerContext
    ) -> pb.ListEmailTemplatesResponse:
        rows, token = await self.templates.list(caller_account_id(), request.page_size, request.page_token)
        return pb.ListEmailTemplatesResponse(
            templates_metadata=[
                pb.EmailTemplateMetadata(template_name=r.name, created_timestamp=timestamp(r.created_at))
                for r in rows
            ],
            next_page_token=token,
        )

    async def TestRenderEmailTemplate(
        self, request: pb.TestRenderEmailTemplateRequest, context: aio.ServicerContext
    ) -> pb.TestRenderEmailTemplateResponse:
        mime, body = await self.acceptor.test_render(
            caller_account_id(), request.template_name, request.template_data
        )
        return pb.TestRenderEmailTemplateResponse(
            rendered_template=mime.decode("ascii"), subject=body.subject, text=body.text, html=body.html
        )

    async def SendEmail(
        self, request: pb.SendEmailRequest, context: aio.ServicerContext
    ) -> pb.SendEmailResponse:
        message_id = await self.acceptor.send_email(caller_account_id(), _send_request(request))
        return pb.SendEmailResponse(message_id=message_id)

    async def SendBulkEmail(
        self, request: pb.SendBulkEmailRequest, context: aio.ServicerContext
    ) -> pb.SendBulkEmailResponse:
        results = await self.acceptor.send_bulk(caller_account_id(), _bulk_request(request))
        return pb.SendBulkEmailResponse(
            bulk_email_entry_results=[
                pb.BulkEmailEntryResult(
                    status=pb.BulkEmailStatus.Value(f"BULK_EMAIL_STATUS_{r.status}"),
                    error=r.error,
                    message_id=r.message_id,
                )
                for r in results
            ]
        )
