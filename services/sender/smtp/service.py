"""The SMTP submission server as the server bootstrap sees it: `postmesh serve smtp` (or part of `all`).

It is part of the sender service (its accept path, its checks with the other services) but runs as a
unit of its own, so it can be deployed and scaled apart from the gRPC API. It serves no gRPC; its
health name says whether its listeners are up.
"""

from __future__ import annotations

import logging
from typing import Any

import grpc
from grpc import aio
from sqlalchemy.ext.asyncio import AsyncEngine

import services.sender.settings  # registers MESSAGE_ID_DOMAIN
import services.sender.smtp.settings  # noqa: F401 - registers the SMTP settings
from postmesh.common import db
from postmesh.common.clients import domain_error_from
from postmesh.common.errors import Unauthenticated
from postmesh.common.service import Service
from postmesh.common.streams import API_KEY_REVOKED_SUBJECT
from postmesh.events.v1 import events_pb2
from postmesh.identity.v1 import smtp_credentials_pb2
from services.sender.accept import Acceptor
from services.sender.idempotency import IdempotencyKeys
from services.sender.mesh import TIMEOUT, MeshChecks
from services.sender.smtp.credentials import SmtpCredentials
from services.sender.smtp.server import Limits, SubmissionHandler, SubmissionServer
from services.sender.smtp.tls import ReloadingTls
from services.sender.templates import TemplateStore

log = logging.getLogger(__name__)


def _addresses(value: str) -> list[str]:
    return [a.strip() for a in value.split(",") if a.strip()]


class SmtpService(Service):
    name = "smtp"
    # A health-check name only: the unit registers no gRPC service.
    full_name = "postmesh.sender.v1.SmtpSubmission"

    server: SubmissionServer | None = None
    checks: MeshChecks | None = None
    engine: AsyncEngine | None = None

    def register(self, server: aio.Server) -> None:
        settings = self.runtime.settings
        self.starttls = _addresses(settings.smtp_starttls_listen)
        self.implicit_tls = _addresses(settings.smtp_tls_listen)
        # Refuse to start with listeners but no certificate rather than fail at the first STARTTLS.
        self.tls = (
            ReloadingTls(settings.smtp_tls_cert_file, settings.smtp_tls_key_file) if self.listens else None
        )

    @property
    def listens(self) -> bool:
        return bool(self.starttls or self.implicit_tls)

    async def _lookup(self, username: str, password: str) -> str:
        try:
            reply = await self.runtime.clients.identity.AuthenticateSmtpCredential(
                smtp_credentials_pb2.AuthenticateSmtpCredentialRequest(username=username, password=password),
                timeout=TIMEOUT,
            )
        except aio.AioRpcError as exc:
            if exc.code() in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.NOT_FOUND):
                raise Unauthenticated("Authentication Credentials Invalid") from None
            raise domain_error_from(exc) from None
        return reply.account_id

    async def on_ready(self) -> None:
        if not self.listens:
            log.info("SMTP submission has no listener (SMTP_STARTTLS_LISTEN, SMTP_TLS_LISTEN)")
            return
        runtime = self.runtime
        settings = runtime.settings
        assert self.tls is not None and runtime.nats is not None
        # The accept path's own dependencies. A message over SMTP has no request id and raw content, so
        # the sender's tables (request ids, templates) are not read; the engine connects only if they are.
        self.engine = db.create_engine(settings.database_url("sender"))
        sessions = db.session_factory(self.engine)
        self.checks = MeshChecks(runtime.clients)
        await self.checks.watch(runtime.nats)
        acceptor = Acceptor(
            js=runtime.jetstream,
            events=runtime.events,
            checks=self.checks,
            templates=TemplateStore(sessions, runtime.clock),
            keys=IdempotencyKeys(sessions, runtime.clock),
            clock=runtime.clock,
            message_id_domain=settings.message_id_domain,
        )
        credentials = SmtpCredentials(self._lookup, settings.auth_cache_seconds)

        async def on_revoked(msg: Any) -> None:
            credentials.forget(events_pb2.Event.FromString(msg.data).api_key_revoked.key_id)

        # Core subscription: every replica sees every revocation.
        await runtime.nats.subscribe(API_KEY_REVOKED_SUBJECT, cb=on_revoked)
        limits = Limits(
            max_connections=settings.smtp_max_connections,
            max_connections_per_client=settings.smtp_max_connections_per_client,
            max_messages_per_connection=settings.smtp_max_messages_per_connection,
            max_recipients_per_connection=settings.smtp_max_recipients_per_connection,
            max_auth_failures=settings.smtp_max_auth_failures,
            command_timeout=settings.smtp_command_timeout_seconds,
            data_timeout=settings.smtp_data_timeout_seconds,
        )
        self.server = SubmissionServer(
            SubmissionHandler(acceptor, credentials, limits),
            tls=self.tls.context,
            limits=limits,
            hostname=settings.smtp_hostname,
        )
        for address in self.starttls:
            await self.server.listen(address, implicit_tls=False, reuse_port=runtime.worker.shares_ports)
        for address in self.implicit_tls:
            await self.server.listen(address, implicit_tls=True, reuse_port=runtime.worker.shares_ports)
        tls = self.tls
        runtime.spawn(lambda: tls.watch(settings.smtp_tls_reload_seconds), "smtp-tls-reload")

    async def on_stop(self) -> None:
        if self.server is not None:
            await self.server.close(grace=self.runtime.settings.shutdown_grace_seconds)
        if self.checks is not None:
            await self.checks.close()
        if self.engine is not None:
            await self.engine.dispose()


SERVICE = SmtpService
