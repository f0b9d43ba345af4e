"""gRPC surface of SMTP credentials: decode, call the domain, encode."""

from __future__ import annotations

from grpc import aio

from postmesh.common.auth import caller_account_id
from postmesh.common.protoutil import timestamp
from postmesh.identity.v1 import smtp_credentials_pb2 as pb
from services.identity.models import SmtpCredential
from services.identity.smtp_credentials import SmtpCredentialStore


def credential_message(credential: SmtpCredential) -> pb.SmtpCredential:
    return pb.SmtpCredential(
        username=credential.username,
        description=credential.description,
        create_time=timestamp(credential.created_at),
        revoke_time=timestamp(credential.revoked_at),
        revoked=credential.revoked_at is not None,
        last_used_time=timestamp(credential.last_used_at),
    )


class SmtpCredentialsServicer:
    # Bound in IdentityService.on_ready.
    smtp_credentials: SmtpCredentialStore

    async def CreateSmtpCredential(
        self, request: pb.CreateSmtpCredentialRequest, context: aio.ServicerContext
    ) -> pb.CreateSmtpCredentialResponse:
        new = await self.smtp_credentials.create(caller_account_id(), request.description)
        return pb.CreateSmtpCredentialResponse(
            credential=credential_message(new.credential), password=new.password
        )

    async def ListSmtpCredentials(
        self, request: pb.ListSmtpCredentialsRequest, context: aio.ServicerContext
    ) -> pb.ListSmtpCredentialsResponse:
        rows, token = await self.smtp_credentials.list(
            caller_account_id(), request.page_size, request.page_token, request.include_revoked
        )
        return pb.ListSmtpCredentialsResponse(
            credentials=[credential_message(c) for c in rows], next_page_token=token
        )

    async def RevokeSmtpCredential(
        self, request: pb.RevokeSmtpCredentialRequest, context: aio.ServicerContext
    ) -> pb.RevokeSmtpCredentialResponse:
        credential = await self.smtp_credentials.revoke(caller_account_id(), request.username)
        return pb.RevokeSmtpCredentialResponse(credential=credential_message(credential))

    async def AuthenticateSmtpCredential(
        self, request: pb.AuthenticateSmtpCredentialRequest, context: aio.ServicerContext
    ) -> pb.AuthenticateSmtpCredentialResponse:
        credential = await self.smtp_credentials.authenticate(request.username, request.password)
        return pb.AuthenticateSmtpCredentialResponse(
            account_id=credential.account_id, username=credential.username
        )
