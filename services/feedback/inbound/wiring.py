"""The inbound side of one feedback replica: the index of sent messages (fed from Send events by the
service's event consumer, services/feedback/event_consumer.py), the SMTP listener, and the processor
between them, built from the settings."""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import socket
from collections.abc import Iterable, Iterator
from typing import Any

import grpc
from grpc import aio

from postmesh.common.config import Settings
from postmesh.common.service import Runtime
from postmesh.common.streams import IDENTITY_CHANGED_SUBJECT
from postmesh.common.verp import VerpKey
from postmesh.events.v1 import events_pb2 as ev
from postmesh.identity.v1 import identity_pb2
from services.feedback.inbound.domains import BounceDomains
from services.feedback.inbound.listener import InboundListener, ListenerConfig
from services.feedback.inbound.processing import InboundProcessor
from services.feedback.inbound.storage import KeptReports, SentMessages

log = logging.getLogger(__name__)


def feedback_loop_address(settings: Settings) -> str:
    return str(settings.feedback_loop_address or f"fbl@{settings.default_bounce_domain}")


def sent_mails(events: Iterable[ev.Event]) -> Iterator[tuple[str, ev.Mail]]:
    """(account, mail) of each Send event: what the index of sent messages keeps."""
    for event in events:
        if event.WhichOneof("payload") == "email" and event.email.event_type == ev.EMAIL_EVENT_TYPE_SEND:
            yield event.account_id, event.email.mail


def _host_port(listen: str) -> tuple[str, int]:
    host, _, port = listen.rpartition(":")
    return host.strip("[]"), int(port)


class Inbound:
    def __init__(self, runtime: Runtime) -> None:
        settings = runtime.settings
        self.runtime = runtime
        self.verp_key = VerpKey.from_settings(settings)
        self.messages = SentMessages(runtime.sessions, runtime.clock)
        self.kept = KeptReports(runtime.sessions, runtime.clock)
        self.processor = InboundProcessor(
            messages=self.messages,
            kept=self.kept,
            events=runtime.events,
            verp_key=self.verp_key,
            clock=runtime.clock,
            feedback_loop_address=feedback_loop_address(settings),
        )
        self.domains = BounceDomains(
            default_domain=settings.default_bounce_domain, lookup=self._mail_from_domain
        )
        self._subscription: Any = None
        self.listener: InboundListener | None = None
        if settings.inbound_smtp_listen.strip():
            host, port = _host_port(settings.inbound_smtp_listen.strip())
            self.listener = InboundListener(
                self.processor,
                ListenerConfig(
                    host=host,
                    port=port,
                    hostname=settings.inbound_hostname or socket.getfqdn(),
                    bounce_domain=settings.default_bounce_domain,
                    feedback_loop_address=feedback_loop_address(settings),
                    max_message_bytes=settings.inbound_max_message_bytes,
                    max_connections=settings.inbound_max_connections,
                    max_connections_per_client=settings.inbound_max_connections_per_client,
                    tls_cert_file=settings.inbound_tls_cert_file,
                    tls_key_file=settings.inbound_tls_key_file,
                    reuse_port=runtime.worker.shares_ports,
                ),
                self.domains,
            )

    async def _mail_from_domain(self, domain: str) -> bool:
        try:
            reply = await self.runtime.clients.identity.CheckMailFromDomain(
                identity_pb2.CheckMailFromDomainRequest(domain=domain), timeout=10
            )
        except aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.INVALID_ARGUMENT:
                return False  # not a domain name at all: certainly not ours
            raise
        return bool(reply.in_use)

    async def _prune(self) -> None:
        settings = self.runtime.settings
        while True:
            now = self.runtime.clock.now()
            await self.messages.forget_before(now - dt.timedelta(days=settings.sent_message_index_days))
            await self.kept.forget_before(now - dt.timedelta(days=settings.kept_report_days))
            await asyncio.sleep(3600)

    async def start(self) -> None:
        runtime = self.runtime
        runtime.spawn_once(self._prune, "sent-index-prune")
        if self.listener is not None:
            assert runtime.nats is not None

            async def forget(_: Any) -> None:
                self.domains.forget()

            # Core subscription: every replica drops its answers (a JetStream publish is also a core message).
            self._subscription = await runtime.nats.subscribe(IDENTITY_CHANGED_SUBJECT, cb=forget)
            await self.listener.start()

    async def stop(self) -> None:
        if self.listener is not None:
            await self.listener.stop()
        nats = self.runtime.nats
        if self._subscription is not None and nats is not None and nats.is_connected:
            await self._subscription.unsubscribe()
