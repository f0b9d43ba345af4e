"""gRPC surface of the sender service."""

from __future__ import annotations

from grpc import aio

from postmesh.common.auth import caller_account_id
from postmesh.common.protoutil import timestamp
from postmesh.sender.v1 import sender_pb2 as pb
from postmesh.sender.v1 import sender_pb2_grpc
from services.sender.templates import TemplateContent, TemplateStore


def _content(message: pb.EmailTemplateContent) -> TemplateContent:
    return TemplateContent(subject=message.subject, text=message.text, html=message.html)


class SenderServicer(sender_pb2_grpc.SenderServiceServicer):
    # Bound in SenderService.on_ready.
    templates: TemplateStore

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
