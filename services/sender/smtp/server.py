"""The SMTP submission server: aiosmtpd sessions that end in the accept path (services/sender/accept.py).

A session goes: EHLO, STARTTLS (or a connection that is TLS from the start), AUTH PLAIN or LOGIN, then
messages. A message is handed to the Acceptor only once its whole DATA is in; the 250 reply names the
MessageId that JetStream stored and every event carries. A client that goes away before the end of
DATA leaves nothing behind: no message, no quota used.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
from base64 import b64decode
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from aiosmtpd.smtp import MISSING, SMTP, AuthResult, Envelope, Session
from prometheus_client import Counter as MetricCounter
from prometheus_client import Gauge

from postmesh.common.connlimits import ConnectionLimits, say_and_close
from postmesh.common.errors import PostmeshError, Unauthenticated
from services.sender.accept import MAX_RECIPIENTS, Acceptor, Destination, SendRequest
from services.sender.accept import Envelope as SendEnvelope
from services.sender.mime import MAX_MESSAGE_BYTES
from services.sender.smtp import replies
from services.sender.smtp.credentials import SmtpCredentials, SmtpLogin
from services.sender.smtp.options import split_options

log = logging.getLogger(__name__)


class _QuietAiosmtpd(logging.Filter):
    """aiosmtpd logs every command at INFO and a deprecation warning at every AUTH (its own code sets
    the deprecated attribute): postmesh logs one line per message instead."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno <= logging.INFO:
            return False
        return not str(record.msg).startswith("Session.login_data is deprecated")


logging.getLogger("mail.log").addFilter(_QuietAiosmtpd())

SMTP_MESSAGES = MetricCounter(
    "postmesh_smtp_messages_total", "Messages received over SMTP, by reply code", ["code"]
)
SMTP_AUTH = MetricCounter("postmesh_smtp_auth_total", "SMTP AUTH attempts, by result", ["result"])
SMTP_CONNECTIONS = Gauge("postmesh_smtp_connections", "SMTP connections open")
SMTP_CONNECTIONS_REFUSED = MetricCounter(
    "postmesh_smtp_connections_refused_total", "SMTP connections refused by the connection limits"
)


@dataclass(frozen=True)
class Limits:
    max_connections: int = 1000
    max_connections_per_client: int = 50
    max_messages_per_connection: int = 1000
    max_recipients_per_connection: int = 10000
    max_auth_failures: int = 3
    command_timeout: float = 300.0
    data_timeout: float = 600.0


class ConnectionGate:
    """Connections open now, in total and per client address, across every listener of the process."""

    def __init__(self, limits: Limits) -> None:
        self._connections = ConnectionLimits(limits.max_connections, limits.max_connections_per_client)

    @property
    def open(self) -> int:
        return self._connections.total

    def enter(self, client: str) -> bool:
        if not self._connections.enter(client):
            SMTP_CONNECTIONS_REFUSED.inc()
            return False
        SMTP_CONNECTIONS.inc()
        return True

    def leave(self, client: str) -> None:
        SMTP_CONNECTIONS.dec()
        self._connections.leave(client)


def submission_request(mail_from: str, recipients: Sequence[str], data: bytes) -> SendRequest:
    """What a received message asks of the accept path: SendEmail with raw content.

    As in SES, the envelope sender (MAIL FROM) is the message's Source and the header From must also be
    an identity the account may send as; with a null sender (MAIL FROM:<>) the header From alone is."""
    options, raw = split_options(data)
    return SendRequest(
        envelope=SendEnvelope(
            from_email_address=mail_from,
            from_identity=options.identity,
            configuration_set=options.configuration_set,
        ),
        destination=Destination(to=list(recipients)),
        tags=options.tags,
        raw=raw,
    )


def _decode(value: str) -> bytes | None:
    try:
        return b64decode(value.encode(), validate=True)
    except ValueError:
        return None


class SubmissionHandler:
    """aiosmtpd hooks. auth_PLAIN and auth_LOGIN replace aiosmtpd's own, whose credential check cannot
    wait for identity's answer."""

    def __init__(self, acceptor: Acceptor, credentials: SmtpCredentials, limits: Limits) -> None:
        self._acceptor = acceptor
        self._credentials = credentials
        self._limits = limits
        # Messages being accepted now: shutdown waits for them, so no client misses its 250.
        self.in_flight = 0
        self.idle = asyncio.Event()
        self.idle.set()
        self.closing = False

    async def handle_EHLO(
        self, server: SMTP, session: Session, envelope: Envelope, hostname: str, responses: list[str]
    ) -> list[str]:
        session.host_name = hostname
        return [*responses[:-1], "250-PIPELINING", responses[-1]]

    # --- AUTH

    async def auth_PLAIN(self, server: SMTP, args: list[str]) -> AuthResult:
        if len(args) == 1:
            answer = await server.challenge_auth("")
            if answer is MISSING:
                return AuthResult(success=False)
            data: bytes | None = answer
        else:
            data = _decode(args[1])
        if data is None:
            await server.push("501 5.5.2 Cannot decode base64")
            return AuthResult(success=False, handled=True)
        parts = data.split(b"\x00")
        if len(parts) != 3:
            await server.push("501 5.5.2 Cannot split the PLAIN response")
            return AuthResult(success=False, handled=True)
        return await self._login(server, parts[1], parts[2])

    async def auth_LOGIN(self, server: SMTP, args: list[str]) -> AuthResult:
        if len(args) == 1:
            answer = await server.challenge_auth(server.AuthLoginUsernameChallenge)
            if answer is MISSING:
                return AuthResult(success=False)
            username: bytes | None = answer
        else:
            username = _decode(args[1])
        if username is None:
            await server.push("501 5.5.2 Cannot decode base64")
            return AuthResult(success=False, handled=True)
        password = await server.challenge_auth(server.AuthLoginPasswordChallenge)
        if password is MISSING:
            return AuthResult(success=False)
        return await self._login(server, username, password)

    async def _login(self, server: SMTP, username: bytes, password: bytes) -> AuthResult:
        session = server.session
        assert session is not None
        try:
            login = await self._credentials.login(
                username.decode("utf-8", "replace"), password.decode("utf-8", "replace")
            )
        except Unauthenticated:
            SMTP_AUTH.labels("invalid").inc()
            failures = getattr(session, "auth_failures", 0) + 1
            session.auth_failures = failures  # type: ignore[attr-defined]
            if failures >= self._limits.max_auth_failures:
                await server.push(replies.TOO_MANY_AUTH_FAILURES_REPLY)
                assert server.transport is not None
                server.transport.close()
                return AuthResult(success=False, handled=True)
            return AuthResult(success=False, handled=False, message=replies.CREDENTIALS_INVALID_REPLY)
        except PostmeshError:
            SMTP_AUTH.labels("unavailable").inc()
            return AuthResult(success=False, handled=False, message=replies.AUTH_UNAVAILABLE_REPLY)
        SMTP_AUTH.labels("ok").inc()
        return AuthResult(success=True, auth_data=login)

    def _logged_in(self, session: Session) -> SmtpLogin | None:
        login = session.auth_data
        if isinstance(login, SmtpLogin) and self._credentials.still_valid(login):
            return login
        session.authenticated = False
        return None

    # --- Transactions

    async def handle_MAIL(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, mail_options: list[str]
    ) -> str:
        if self.closing:
            return replies.SHUTTING_DOWN_REPLY
        if self._logged_in(session) is None:
            return replies.CREDENTIALS_INVALID_REPLY
        if getattr(session, "messages", 0) >= self._limits.max_messages_per_connection:
            return replies.CONNECTION_MESSAGES_REPLY
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return "250 OK"

    async def handle_RCPT(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, rcpt_options: list[str]
    ) -> str:
        if len(envelope.rcpt_tos) >= MAX_RECIPIENTS:
            return replies.MAX_RECIPIENTS_REPLY.format(limit=MAX_RECIPIENTS)
        named = getattr(session, "recipients", 0)
        if named >= self._limits.max_recipients_per_connection:
            return replies.CONNECTION_RECIPIENTS_REPLY
        session.recipients = named + 1  # type: ignore[attr-defined]
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(rcpt_options)
        return "250 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        login = self._logged_in(session)
        if login is None:
            return replies.CREDENTIALS_INVALID_REPLY
        session.messages = getattr(session, "messages", 0) + 1  # type: ignore[attr-defined]
        data = envelope.original_content or b""
        message_id = ""
        self.in_flight += 1
        self.idle.clear()
        try:
            request = submission_request(envelope.mail_from or "", envelope.rcpt_tos, data)
            message_id = await self._acceptor.send_email(login.account_id, request)
            reply = replies.accepted_reply(message_id)
        except PostmeshError as error:
            reply = replies.reply_for(error)
        finally:
            self.in_flight -= 1
            if not self.in_flight:
                self.idle.set()
        SMTP_MESSAGES.labels(reply[:3]).inc()
        log.info(
            "smtp message",
            extra={
                "account": login.account_id,
                "username": login.username,
                "message_id": message_id,
                "reply": reply[:3],
                "bytes": len(data),
                "recipients": len(envelope.rcpt_tos),
            },
        )
        return reply

    async def handle_exception(self, error: Exception) -> str:
        log.exception("SMTP session failed", exc_info=error)
        return replies.LOCAL_ERROR_REPLY


class SubmissionSMTP(SMTP):
    """aiosmtpd's SMTP with connection limits and a DATA timeout apart from the command timeout."""

    def __init__(
        self,
        handler: SubmissionHandler,
        *,
        gate: ConnectionGate,
        limits: Limits,
        implicit_tls: bool,
        sessions: set[SubmissionSMTP],
        **kwargs: Any,
    ) -> None:
        super().__init__(handler, timeout=limits.command_timeout, auth_require_tls=True, **kwargs)
        if implicit_tls:
            # The connection is TLS from its first byte, which aiosmtpd cannot tell from plain text:
            # AUTH is offered at once.
            self._auth_require_tls = False
        self._gate = gate
        self._sessions = sessions
        self._data_timeout = limits.data_timeout
        self._client: str | None = None
        self._refused = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if self.transport is None and self._client is None and not self._refused:
            peer = transport.get_extra_info("peername")
            client = str(peer[0]) if peer else ""
            if not self._gate.enter(client):
                self._refused = True
                say_and_close(transport, replies.TOO_MANY_CONNECTIONS_REPLY)
                return
            self._client = client
            self._sessions.add(self)
        super().connection_made(transport)

    def connection_lost(self, error: Exception | None) -> None:
        if self._refused:
            return
        if self._client is not None:
            self._gate.leave(self._client)
            self._client = None
        self._sessions.discard(self)
        super().connection_lost(error)

    def say_goodbye(self) -> None:
        """At shutdown: tells the client to come back (421) and closes the connection."""
        if self.transport is not None:
            say_and_close(self.transport, replies.SHUTTING_DOWN_REPLY)

    def eof_received(self) -> bool | None:
        if self._refused:
            return False
        return super().eof_received()

    async def check_auth_needed(self, caller_method: str) -> bool:
        # aiosmtpd's own text carries an enhanced status code SES's reply does not.
        assert self.session is not None
        if not self.session.authenticated:
            await self.push(replies.AUTHENTICATION_REQUIRED_REPLY)
            return True
        return False

    async def smtp_DATA(self, arg: str) -> None:
        self._reset_timeout(self._data_timeout)
        try:
            await super().smtp_DATA(arg)
        finally:
            if self.transport is not None:
                self._reset_timeout()


class SubmissionServer:
    """The process's SMTP listeners: STARTTLS ones and implicit TLS ones, sharing one connection gate."""

    def __init__(
        self,
        handler: SubmissionHandler,
        *,
        tls: ssl.SSLContext,
        limits: Limits,
        hostname: str = "",
    ) -> None:
        self._handler = handler
        self._tls = tls
        self._limits = limits
        # aiosmtpd would look the name up for every connection.
        self._hostname = hostname or socket.getfqdn()
        self.gate = ConnectionGate(limits)
        self._sessions: set[SubmissionSMTP] = set()
        self._servers: list[asyncio.Server] = []
        self.starttls_ports: list[int] = []
        self.tls_ports: list[int] = []

    def _protocol(self, *, implicit_tls: bool) -> SubmissionSMTP:
        return SubmissionSMTP(
            self._handler,
            gate=self.gate,
            sessions=self._sessions,
            limits=self._limits,
            hostname=self._hostname,
            data_size_limit=MAX_MESSAGE_BYTES,
            enable_SMTPUTF8=True,
            implicit_tls=implicit_tls,
            tls_context=None if implicit_tls else self._tls,
            require_starttls=not implicit_tls,
            auth_required=True,
            ident="postmesh",
        )

    async def listen(self, address: str, *, implicit_tls: bool, reuse_port: bool = False) -> int:
        host, _, port = address.rpartition(":")
        host = host.strip("[]") or "127.0.0.1"
        loop = asyncio.get_running_loop()
        server = await loop.create_server(
            lambda: self._protocol(implicit_tls=implicit_tls),
            host=host,
            port=int(port),
            ssl=self._tls if implicit_tls else None,
            reuse_port=reuse_port or None,
        )
        self._servers.append(server)
        bound = int(server.sockets[0].getsockname()[1])
        (self.tls_ports if implicit_tls else self.starttls_ports).append(bound)
        log.info("SMTP listening", extra={"address": f"{host}:{bound}", "implicit_tls": implicit_tls})
        return bound

    async def close(self, grace: float = 10.0) -> None:
        """Stops listening, lets messages being accepted get their reply (up to `grace` seconds), then
        answers every open session 421 and closes it: clients retry elsewhere, nothing is half-done."""
        for server in self._servers:
            server.close()
        self._handler.closing = True
        try:
            async with asyncio.timeout(grace):
                await self._handler.idle.wait()
        except TimeoutError:
            log.warning(
                "SMTP messages still being accepted at shutdown", extra={"count": self._handler.in_flight}
            )
        for session in list(self._sessions):
            session.say_goodbye()
        for server in self._servers:
            try:
                async with asyncio.timeout(5):
                    await server.wait_closed()
            except TimeoutError:
                log.warning("SMTP connections still open at shutdown")
        self._servers.clear()
