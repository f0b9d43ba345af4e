"""The inbound SMTP listener: the MX of the bounce domains and of the custom MAIL FROM domains, and
the operator's feedback-loop address. It takes mail only for those, never relays, and never answers a
message with a message.

What it accepts at RCPT: any address at DEFAULT_BOUNCE_DOMAIN or at the custom MAIL FROM domain of a
verified domain identity (a forged bounce address there is kept, with the reason, for the operator),
and the feedback-loop address. Everything else gets 550.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiosmtpd.smtp import SMTP, Envelope, Session

from postmesh.common.certs import pem, self_signed
from postmesh.common.connlimits import ConnectionLimits, say_and_close
from services.feedback.inbound.domains import BounceDomains
from services.feedback.inbound.processing import InboundProcessor

log = logging.getLogger(__name__)

MAX_RECIPIENTS = 100


@dataclass(frozen=True)
class ListenerConfig:
    host: str
    port: int
    hostname: str
    bounce_domain: str
    feedback_loop_address: str
    max_message_bytes: int
    max_connections: int
    # Connections at once from one client address (Postfix's smtpd_client_connection_count_limit);
    # 0: only the total limit.
    max_connections_per_client: int = 0
    tls_cert_file: str = ""
    tls_key_file: str = ""
    timeout_seconds: float = 300.0
    # Beside the other worker processes of one `serve all` (postmesh.common.workers).
    reuse_port: bool = False


class InboundHandler:
    """aiosmtpd hooks: each returns the reply line."""

    def __init__(self, processor: InboundProcessor, config: ListenerConfig, domains: BounceDomains) -> None:
        self._processor = processor
        self._config = config
        self._domains = domains

    async def accepts(self, address: str) -> bool:
        address = address.strip().strip("<>")
        if address.lower() == self._config.feedback_loop_address.lower():
            return True
        return await self._domains.accepts(address.rpartition("@")[2])

    async def handle_RCPT(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, rcpt_options: list[str]
    ) -> str:
        if len(envelope.rcpt_tos) >= MAX_RECIPIENTS:
            return "452 4.5.3 Too many recipients"
        try:
            accepted = await self.accepts(address)
        except Exception:
            log.exception("bounce domains could not be checked")
            return "451 4.4.3 Cannot check the domain now; try again later"
        if not accepted:
            return "550 5.7.1 Relaying denied: not a postmesh bounce or feedback address"
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        raw = envelope.original_content or envelope.content or b""
        if isinstance(raw, str):
            raw = raw.encode("utf-8", "surrogateescape")
        try:
            outcome = await self._processor.process(raw, envelope.mail_from or "", list(envelope.rcpt_tos))
        except Exception:
            # Database or NATS away: the sending MTA keeps the report and tries again later.
            log.exception("inbound report could not be recorded")
            return "451 4.3.0 Could not record the report now; try again later"
        if outcome.kept_id:
            return f"250 2.0.0 Kept as {outcome.kept_id}"
        return "250 2.0.0 Recorded"


class _CountedSMTP(SMTP):
    """aiosmtpd's SMTP, refusing with 421 a connection over the limits (before any greeting)."""

    def __init__(self, connections: ConnectionLimits, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._connections = connections
        self._client: str | None = None
        self._refused = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # Called again on the TLS transport after STARTTLS: the connection is counted once.
        if self.transport is None and self._client is None and not self._refused:
            peer = transport.get_extra_info("peername")
            client = str(peer[0]) if peer else ""
            if not self._connections.enter(client):
                self._refused = True
                say_and_close(transport, "421 4.7.0 Too many connections; try again later")
                return
            self._client = client
        super().connection_made(transport)

    def connection_lost(self, error: Exception | None) -> None:
        if self._refused:
            return
        if self._client is not None:
            self._connections.leave(self._client)
            self._client = None
        super().connection_lost(error)

    def eof_received(self) -> bool | None:
        if self._refused:
            return False
        return super().eof_received()


def self_signed_context(hostname: str) -> ssl.SSLContext:
    """A TLS context with a certificate made now: MTAs delivering bounces do not verify it, and
    STARTTLS still keeps reports (recipient addresses) off the wire in clear text."""
    cert_pem, key_pem = pem(*self_signed([hostname or "postmesh"]))
    with tempfile.TemporaryDirectory() as folder:
        cert_path, key_path = Path(folder, "cert.pem"), Path(folder, "key.pem")
        cert_path.write_bytes(cert_pem)
        key_path.write_bytes(key_pem)
        return _context(str(cert_path), str(key_path))


def _context(cert_file: str, key_file: str) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert_file, key_file)
    return context


class InboundListener:
    def __init__(self, processor: InboundProcessor, config: ListenerConfig, domains: BounceDomains) -> None:
        self.config = config
        self.handler = InboundHandler(processor, config, domains)
        self._server: asyncio.base_events.Server | None = None
        # One sending host cannot take every slot: a provider's flood of reports leaves room for others'.
        self._connections = ConnectionLimits(config.max_connections, config.max_connections_per_client)
        self.port = 0

    async def start(self) -> None:
        config = self.config
        if config.tls_cert_file:
            tls = _context(config.tls_cert_file, config.tls_key_file or config.tls_cert_file)
        else:
            tls = await asyncio.to_thread(self_signed_context, config.hostname)

        def factory() -> asyncio.Protocol:
            return _CountedSMTP(
                self._connections,
                self.handler,
                hostname=config.hostname,
                data_size_limit=config.max_message_bytes,
                tls_context=tls,
                timeout=config.timeout_seconds,
                # Bounces arrive from anywhere; reports never carry our credentials.
                auth_require_tls=False,
            )

        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            factory, host=config.host or None, port=config.port, reuse_port=config.reuse_port or None
        )
        self.port = self._server.sockets[0].getsockname()[1]
        log.info("inbound SMTP listening", extra={"host": config.host, "port": self.port})

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
