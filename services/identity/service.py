"""The identity service as the server bootstrap sees it."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

from grpc import aio

import services.identity.settings  # noqa: F401 - registers the service's settings
from postmesh.common.auth import Access
from postmesh.common.clients import domain_error_from, for_account
from postmesh.common.errors import NotFound
from postmesh.common.service import Service
from postmesh.feedback.v1.configuration_sets_pb2 import (
    GetConfigurationSetEventDestinationsRequest,
    GetConfigurationSetRequest,
)
from postmesh.identity.v1 import identity_pb2, identity_pb2_grpc
from services.identity.accesskeys import AccessKeyStore
from services.identity.accounts import AccountStore
from services.identity.dkimkeys import MasterKeys
from services.identity.dnslookup import DnsLookup
from services.identity.httpconfirm import ConfirmationServer
from services.identity.identities import SYSTEM_ACCOUNT_ID, IdentityConfig, IdentityStore
from services.identity.mailer import VerificationMailer
from services.identity.models import Base
from services.identity.servicer import IdentityServicer
from services.identity.smtp_credentials import SmtpCredentialStore
from services.identity.verification import CheckSchedule, DomainVerifier


class IdentityService(Service):
    name = "identity"
    full_name = identity_pb2.DESCRIPTOR.services_by_name["IdentityService"].full_name
    access = {
        "CreateAccount": Access.ADMIN,
        "ListAccounts": Access.ADMIN,
        "AuthenticateApiKey": Access.INTERNAL,
        "AuthenticateSmtpCredential": Access.INTERNAL,
        "AuthorizeSender": Access.INTERNAL,
        "CheckVerifiedRecipients": Access.INTERNAL,
        "GetSigningConfig": Access.INTERNAL,
        "CheckMailFromDomain": Access.INTERNAL,
        # The token in the request is the credential: the person clicking has no API key.
        "ConfirmEmailIdentity": Access.PUBLIC,
        "RewrapDkimKeys": Access.ADMIN,
        "GetSystemEmailIdentity": Access.ADMIN,
        "VerifyAccessKeySignature": Access.INTERNAL,
    }
    metadata = Base.metadata
    migrations_dir = Path(__file__).parent / "migrations"

    def register(self, server: aio.Server) -> None:
        # Refuse to start without a master key rather than store DKIM keys unprotected.
        self.master_keys = MasterKeys.parse(self.runtime.settings.dkim_master_keys)
        self.servicer = IdentityServicer()
        identity_pb2_grpc.add_IdentityServiceServicer_to_server(self.servicer, server)
        self.http: ConfirmationServer | None = None

    def link_base(self) -> str:
        settings = self.runtime.settings
        if settings.identity_public_url:
            return str(settings.identity_public_url)
        host = settings.identity_http_listen.rpartition(":")[0] or "127.0.0.1"
        if host in ("0.0.0.0", "[::]", "::"):
            host = "127.0.0.1"
        port = self.http.port if self.http is not None else 0
        return f"http://{host}:{port}"

    async def on_ready(self) -> None:
        runtime = self.runtime
        settings = runtime.settings
        self.servicer.accounts = AccountStore(runtime.sessions, runtime.clock, runtime.events)
        self.servicer.smtp_credentials = SmtpCredentialStore(runtime.sessions, runtime.clock, runtime.events)
        self.servicer.access_keys = AccessKeyStore(runtime.sessions, runtime.clock, self.master_keys)
        config = IdentityConfig.from_settings(settings)
        self.verifier = DomainVerifier(
            runtime.sessions,
            runtime.clock,
            runtime.events,
            DnsLookup(settings.dns_resolver, settings.dns_timeout_seconds),
            CheckSchedule(
                initial_seconds=settings.dns_check_initial_seconds,
                max_seconds=settings.dns_check_max_seconds,
                recheck_seconds=settings.dns_recheck_seconds,
                verification_window=dt.timedelta(hours=settings.domain_verification_hours),
            ),
            config.mail_from_mx_host,
            config.mail_from_spf,
        )
        mailer = VerificationMailer(
            runtime.jetstream,
            runtime.clock,
            system_account_id=SYSTEM_ACCOUNT_ID,
            system_address=config.system_address,
            link_base=self.link_base,
            message_id_domain=settings.values.get("MESSAGE_ID_DOMAIN", ""),
        )
        store = IdentityStore(
            runtime.sessions, runtime.clock, runtime.events, self.master_keys, config, mailer, self.verifier
        )
        self.servicer.identities = store

        async def check_configuration_set(account_id: str, name: str) -> None:
            try:
                await runtime.clients.feedback.GetConfigurationSet(
                    GetConfigurationSetRequest(configuration_set_name=name),
                    metadata=for_account(account_id),
                    timeout=10.0,
                )
            except aio.AioRpcError as exc:
                raise domain_error_from(exc) from None

        self.servicer.check_configuration_set = check_configuration_set

        async def check_webhook_destination(account_id: str, set_name: str, name: str) -> None:
            try:
                reply = await runtime.clients.feedback.GetConfigurationSetEventDestinations(
                    GetConfigurationSetEventDestinationsRequest(configuration_set_name=set_name),
                    metadata=for_account(account_id),
                    timeout=10.0,
                )
            except aio.AioRpcError as exc:
                raise domain_error_from(exc) from None
            if not any(d.name == name and d.HasField("webhook") for d in reply.event_destinations):
                raise NotFound(f"Configuration set {set_name} has no webhook event destination {name}.")

        self.servicer.check_webhook_destination = check_webhook_destination
        await store.ensure_system_identity()
        if settings.identity_http_listen:

            async def confirm(token: str) -> str:
                identity, _ = await store.confirm(token)
                return identity

            self.http = ConfirmationServer(
                settings.identity_http_listen, confirm, reuse_port=runtime.worker.shares_ports
            )
            await self.http.start()
        poll = settings.dns_check_poll_seconds
        runtime.spawn_once(lambda: self.verifier.run(poll), "dns-checker")

    async def on_stop(self) -> None:
        if self.http is not None:
            await self.http.stop()


SERVICE = IdentityService
