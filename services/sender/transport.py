"""How a signed message reaches its recipients: SMTP (to MX hosts or one smarthost) or a folder.

Every attempt ends, per recipient, in one Outcome: delivered, transient (retry later) or permanent.
"""

from __future__ import annotations

import asyncio
import collections
import enum
import logging
import re
import ssl
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, cast

import aiosmtplib

from postmesh.common import eventloop
from postmesh.common.metrics import SMTP_CONNECTIONS, destination_label
from services.sender.mx import MxResolver, RouteError

log = logging.getLogger(__name__)

_ENHANCED = re.compile(r"^\s*([245]\.\d{1,3}\.\d{1,3})\b")


class Kind(enum.Enum):
    DELIVERED = "delivered"
    TRANSIENT = "transient"
    PERMANENT = "permanent"


# SES's DeliveryDelay types we can tell apart.
DELAY_COMMUNICATION = "TransientCommunicationFailure"
DELAY_RECIPIENT_SERVER = "RecipientServerError"
DELAY_MAILBOX_FULL = "MailboxFull"
DELAY_INTERNAL = "InternalFailure"


@dataclass(frozen=True)
class Outcome:
    kind: Kind
    # The whole reply line ("550 5.1.1 <x@y>: user unknown") or what went wrong before any reply.
    response: str
    status: str  # enhanced status code, e.g. 5.1.1
    remote_mta: str = ""
    remote_ip: str = ""
    delay_type: str = ""


def enhanced_status(code: int, text: str) -> str:
    found = _ENHANCED.match(text)
    return found.group(1) if found else f"{code // 100}.0.0"


def reply_outcome(code: int, text: str, *, remote_mta: str, remote_ip: str) -> Outcome:
    """The outcome an SMTP reply means."""
    text = " ".join(text.split())
    status = enhanced_status(code, text)
    response = f"{code} {text}".strip()
    if 200 <= code < 300:
        return Outcome(Kind.DELIVERED, response, status, remote_mta, remote_ip)
    if 500 <= code < 600:
        return Outcome(Kind.PERMANENT, response, status, remote_mta, remote_ip)
    delay = DELAY_MAILBOX_FULL if status == "4.2.2" else DELAY_RECIPIENT_SERVER
    return Outcome(Kind.TRANSIENT, response, status, remote_mta, remote_ip, delay)


def failure_outcome(
    reason: str, *, status: str = "4.4.1", remote_mta: str = "", remote_ip: str = ""
) -> Outcome:
    """A transient failure without an SMTP reply: refused or lost connection, timeout, no TLS."""
    return Outcome(Kind.TRANSIENT, reason, status, remote_mta, remote_ip, DELAY_COMMUNICATION)


@dataclass(frozen=True)
class Envelope:
    message_id: str
    mail_from: str
    recipients: tuple[str, ...]
    domain: str  # the recipients' domain (all of them, when the transport groups by domain)
    require_tls: bool


class Transport(Protocol):
    # True: one transaction per recipient domain; False: one for all of a message's recipients.
    groups_by_domain: bool

    async def deliver(self, envelope: Envelope, data: bytes) -> dict[str, Outcome]: ...

    async def close(self) -> None: ...


class SinkTransport:
    """Stores each message as DIR/<message id>.eml, as a local MDA would: a newcomer opens what was sent.
    A redelivered message overwrites its file, so the folder holds each message once."""

    groups_by_domain = False

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def _write(self, envelope: Envelope, data: bytes) -> Path:
        self.directory.mkdir(parents=True, exist_ok=True)
        safe = re.sub(r"[^A-Za-z0-9._@+=-]", "_", envelope.message_id)
        path = self.directory / f"{safe}.eml"
        trace = f"Return-Path: <{envelope.mail_from}>\r\n" + "".join(
            f"Delivered-To: {r}\r\n" for r in envelope.recipients
        )
        tmp = path.with_suffix(".eml.tmp")
        tmp.write_bytes(trace.encode("utf-8") + data)
        tmp.replace(path)
        return path

    async def deliver(self, envelope: Envelope, data: bytes) -> dict[str, Outcome]:
        path = await asyncio.to_thread(self._write, envelope, data)
        delivered = Outcome(Kind.DELIVERED, f"250 2.0.0 stored in {path.name}", "2.0.0", "sink")
        return dict.fromkeys(envelope.recipients, delivered)

    async def close(self) -> None:
        return None


@dataclass(frozen=True)
class Destination:
    """One receiving server as a connection pool key."""

    host: str  # the name it is known by (MX name, smarthost name): SNI and reporting
    address: str
    port: int


@dataclass(frozen=True)
class SmtpOptions:
    helo_name: str
    timeout: float
    tls_verify: bool = False
    # none, opportunistic, starttls (required) or tls (implicit, from the first byte)
    tls_mode: str = "opportunistic"
    username: str = ""
    password: str = ""
    max_connections_per_host: int = 16
    idle_seconds: float = 30.0
    max_messages_per_connection: int = 200


class _Connection:
    def __init__(self, smtp: aiosmtplib.SMTP) -> None:
        self.smtp = smtp
        self.messages = 0
        self.idle_since = time.monotonic()


class ConnectError(Exception):
    """No SMTP session could be set up with a destination (refused, timed out, greeting refused,
    TLS required and not offered...)."""


class SmtpPool:
    """Open SMTP sessions per destination, reused between messages, at most N per destination."""

    def __init__(self, options: SmtpOptions) -> None:
        self.options = options
        self._idle: dict[Destination, list[_Connection]] = {}
        self._slots: dict[Destination, asyncio.Semaphore] = {}
        self._tls_context = ssl.create_default_context()
        if not options.tls_verify:
            # Opportunistic TLS (RFC 7435): encrypt against passive listeners even when the
            # certificate would not verify, as MTAs do.
            self._tls_context.check_hostname = False
            self._tls_context.verify_mode = ssl.CERT_NONE

    async def _open(self, dest: Destination, require_tls: bool, *, try_tls: bool = True) -> _Connection:
        opts = self.options
        smtp = aiosmtplib.SMTP(
            hostname=dest.address,
            port=dest.port,
            local_hostname=opts.helo_name,
            timeout=opts.timeout,
            use_tls=opts.tls_mode == "tls",
            start_tls=False,
            tls_context=self._tls_context,
            validate_certs=opts.tls_verify,
        )
        secured = opts.tls_mode == "tls"
        try:
            await smtp.connect()
            await smtp.ehlo()
            wants_tls = opts.tls_mode in ("opportunistic", "starttls") or require_tls
            if opts.tls_mode != "tls" and wants_tls:
                if smtp.supports_extension("starttls") and try_tls:
                    try:
                        await smtp.starttls(server_hostname=dest.host, tls_context=self._tls_context)
                    except (aiosmtplib.SMTPException, ssl.SSLError, OSError) as exc:
                        if require_tls or opts.tls_mode == "starttls":
                            raise ConnectError(f"STARTTLS with {dest.host} failed: {exc}") from exc
                        # Opportunistic: a broken TLS set-up must not stop the mail; go plain.
                        smtp.close()
                        return await self._open(dest, require_tls, try_tls=False)
                    secured = True
                    await smtp.ehlo()
                elif require_tls or opts.tls_mode == "starttls":
                    raise ConnectError(f"{dest.host} does not offer STARTTLS, and TLS is required")
            if opts.username:
                await smtp.login(opts.username, opts.password)
        except ConnectError:
            SMTP_CONNECTIONS.labels(destination_label(dest.host), "failed").inc()
            smtp.close()
            raise
        except (TimeoutError, aiosmtplib.SMTPException, OSError) as exc:
            SMTP_CONNECTIONS.labels(destination_label(dest.host), "failed").inc()
            smtp.close()
            raise ConnectError(f"{dest.host} [{dest.address}]:{dest.port}: {exc}") from exc
        SMTP_CONNECTIONS.labels(destination_label(dest.host), "tls" if secured else "plain").inc()
        return _Connection(smtp)

    def _take_idle(self, dest: Destination, require_tls: bool) -> _Connection | None:
        idle = self._idle.get(dest, [])
        now = time.monotonic()
        while idle:
            conn = idle.pop()
            fresh = now - conn.idle_since < self.options.idle_seconds
            if fresh and conn.smtp.is_connected and not conn.smtp.is_ehlo_or_helo_needed:
                if not require_tls or conn.smtp.get_transport_info("sslcontext") is not None:
                    return conn
            conn.smtp.close()
        return None

    @asynccontextmanager
    async def session(self, dest: Destination, require_tls: bool) -> AsyncIterator[_Connection]:
        """A ready session with `dest` (reused when one is idle), returned to the pool afterwards
        unless the body raised (then it is closed)."""
        slots = self._slots.setdefault(dest, asyncio.Semaphore(self.options.max_connections_per_host))
        async with slots:
            conn = self._take_idle(dest, require_tls) or await self._open(dest, require_tls)
            try:
                yield conn
            except BaseException:
                conn.smtp.close()
                raise
            conn.messages += 1
            if conn.messages >= self.options.max_messages_per_connection or not conn.smtp.is_connected:
                await _quit(conn)
            else:
                conn.idle_since = time.monotonic()
                self._idle.setdefault(dest, []).append(conn)

    async def close_idle(self, *, older_than: float | None = None) -> None:
        limit = self.options.idle_seconds if older_than is None else older_than
        now = time.monotonic()
        for dest, idle in list(self._idle.items()):
            keep = [c for c in idle if now - c.idle_since < limit]
            for conn in idle:
                if conn not in keep:
                    await _quit(conn)
            self._idle[dest] = keep

    async def close(self) -> None:
        await self.close_idle(older_than=0)


async def _quit(conn: _Connection) -> None:
    try:
        await asyncio.wait_for(conn.smtp.quit(), 2.0)
    except (TimeoutError, aiosmtplib.SMTPException, OSError):
        pass
    finally:
        conn.smtp.close()


def _needs_smtputf8(*addresses: str) -> bool:
    return any(not a.isascii() for a in addresses)


# A connection lost, timed out or answering garbage: the session is out of step and is closed.
_LOST = (aiosmtplib.SMTPServerDisconnected, aiosmtplib.SMTPTimeoutError, OSError)


async def _transaction(
    conn: _Connection, envelope: Envelope, data: bytes, dest: Destination
) -> dict[str, Outcome]:
    """MAIL FROM once, RCPT TO per recipient, DATA once for those accepted: an outcome per recipient.
    Raises aiosmtplib errors only for a connection lost before the server took responsibility.
    Pipelined (RFC 2920) when the server offers it, with the same outcome per recipient."""
    smtp = conn.smtp
    where = {"remote_mta": dest.host, "remote_ip": dest.address}
    outcomes: dict[str, Outcome] = {}
    options: list[str] = []
    encoding = "ascii"
    if _needs_smtputf8(envelope.mail_from, *envelope.recipients):
        if not smtp.supports_extension("smtputf8"):
            refused = Outcome(
                Kind.PERMANENT,
                f"553 5.6.7 {dest.host} does not support SMTPUTF8, which the address needs",
                "5.6.7",
                **where,
            )
            return dict.fromkeys(envelope.recipients, refused)
        options, encoding = ["SMTPUTF8"], "utf-8"
    if smtp.supports_extension("8bitmime") and not data.isascii():
        options.append("BODY=8BITMIME")
    if smtp.supports_extension("pipelining"):
        return await _pipelined(smtp, envelope, data, options, encoding, where)
    try:
        reply = await _command(smtp, b"MAIL", b"FROM:", envelope.mail_from, options, encoding)
        if reply.code != 250:
            raise aiosmtplib.SMTPSenderRefused(reply.code, reply.message, envelope.mail_from)
    except aiosmtplib.SMTPSenderRefused as exc:
        refused = reply_outcome(exc.code, exc.message, **where)
        await _reset(smtp)
        return dict.fromkeys(envelope.recipients, refused)
    accepted: list[str] = []
    for recipient in envelope.recipients:
        reply = await _command(smtp, b"RCPT", b"TO:", recipient, [], encoding)
        if reply.code in (250, 251):
            accepted.append(recipient)
        else:
            outcomes[recipient] = reply_outcome(reply.code, reply.message, **where)
    if not accepted:
        await _reset(smtp)
        return outcomes
    try:
        reply = await smtp.data(data)
        final = reply_outcome(reply.code, reply.message, **where)
    except aiosmtplib.SMTPDataError as exc:
        final = reply_outcome(exc.code, exc.message, **where)
        await _reset(smtp)
    except _LOST as exc:
        # The message may or may not have been taken: retrying risks a duplicate, never a loss.
        final = failure_outcome(f"connection lost during DATA: {exc}", **where)
    outcomes.update(dict.fromkeys(accepted, final))
    return outcomes


async def _command(
    smtp: aiosmtplib.SMTP, verb: bytes, prefix: bytes, address: str, options: list[str], encoding: str
) -> aiosmtplib.SMTPResponse:
    """MAIL FROM / RCPT TO with the address as given: it is already validated, and aiosmtplib's own
    quoting re-parses it as a header (slow, and it rewrites quoted local parts)."""
    words = [o.encode("ascii") for o in options]
    return await smtp.execute_command(verb, prefix + f"<{address}>".encode(encoding), *words)


_CONTROL = re.compile(rb"[\x00-\x1f\x7f]")
_LINE_END = re.compile(rb"\r\n|\n|\r(?!\n)")


def _command_line(verb: bytes, address: str, options: list[str], encoding: str) -> bytes:
    line = b" ".join([verb + f"<{address}>".encode(encoding), *(o.encode("ascii") for o in options)])
    if _CONTROL.search(line):  # as aiosmtplib refuses: CR or LF would inject a command
        raise ValueError("Command arg contains a prohibited control character")
    return line + b"\r\n"


def data_payload(data: bytes) -> bytes:
    """What follows DATA's 354: every line ended by CRLF, a leading dot doubled, then CRLF.CRLF.
    The message is CRLF already (signed as sent), so the usual case is one pass of bytes.replace;
    other line endings are normalized as aiosmtplib does for the one-by-one path."""
    if not data.count(b"\n") == data.count(b"\r") == data.count(b"\r\n"):
        data = _LINE_END.sub(b"\r\n", data)
    stuffed = data.replace(b"\n.", b"\n..")
    head = b"." if stuffed.startswith(b".") else b""
    tail = b".\r\n" if stuffed.endswith(b"\r\n") else b"\r\n.\r\n"
    return b"".join((head, stuffed, tail))


class _ReplyReader(asyncio.Protocol):
    """The replies to several pipelined commands, in order. aiosmtplib's protocol reads one reply
    per command sent and drops bytes arriving while no command waits, so a second reply arriving
    with or right after the first would be lost: while a pipelined exchange runs, this protocol
    takes the connection's bytes instead."""

    def __init__(self, seconds_per_reply: float | None) -> None:
        self.seconds_per_reply = seconds_per_reply
        self._buffer = bytearray()
        self._lines: list[bytes] = []
        self._replies: collections.deque[aiosmtplib.SMTPResponse] = collections.deque()
        self._error: Exception | None = None
        self._waiter: asyncio.Future[None] | None = None

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def _fail(self, error: Exception) -> None:
        if self._error is None:
            self._error = error
        self._wake()

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        start = 0
        while (end := self._buffer.find(b"\n", start)) != -1:
            line = bytes(self._buffer[start : end + 1])
            start = end + 1
            code = line[:3]
            if not code.isdigit() or line[3:4] not in (b" ", b"-", b"\r", b"\n"):
                self._fail(aiosmtplib.SMTPResponseException(-1, f"malformed SMTP reply line: {line!r}"))
                return
            self._lines.append(line[4:].strip(b" \t\r\n"))
            if line[3:4] != b"-":
                text = b"\n".join(self._lines).decode("utf-8", "surrogateescape")
                self._replies.append(aiosmtplib.SMTPResponse(int(code), text))
                self._lines = []
        del self._buffer[:start]
        if len(self._buffer) + sum(map(len, self._lines)) > 1 << 15:
            self._fail(aiosmtplib.SMTPResponseException(-1, "SMTP reply too long"))
        self._wake()

    def eof_received(self) -> bool:
        self._fail(aiosmtplib.SMTPServerDisconnected("Unexpected EOF received"))
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        lost = aiosmtplib.SMTPServerDisconnected("Connection lost")
        lost.__cause__ = exc
        self._fail(lost)

    async def read(self) -> aiosmtplib.SMTPResponse:
        """The next reply. After a 421 the server closes: the replies after it count as lost,
        as for the one-by-one path, where aiosmtplib closes on 421."""
        while not self._replies:
            if self._error is not None:
                raise self._error
            waiter = self._waiter = asyncio.get_running_loop().create_future()
            timer = None
            if self.seconds_per_reply is not None:
                timer = eventloop.time_out_after(self.seconds_per_reply, waiter)
            try:
                await waiter
            except TimeoutError as exc:
                raise aiosmtplib.SMTPReadTimeoutError("Timed out waiting for server response") from exc
            finally:
                if timer is not None:
                    timer.cancel()
        reply = self._replies.popleft()
        if reply.code == 421:
            self._replies.clear()
            self._fail(
                aiosmtplib.SMTPServerDisconnected(f"the server is closing: {reply.code} {reply.message}")
            )
        return reply

    @property
    def idle(self) -> bool:
        """Nothing read beyond the replies taken: the session is in step."""
        return not (self._replies or self._lines or self._buffer or self._error)


async def _pipelined(
    smtp: aiosmtplib.SMTP,
    envelope: Envelope,
    data: bytes,
    options: list[str],
    encoding: str,
    where: dict[str, str],
) -> dict[str, Outcome]:
    """RFC 2920: MAIL FROM, every RCPT TO and DATA in one write, their replies read in order, then
    the message in one write. Outcomes as `_transaction`'s one-by-one path gives them; the session
    goes back to aiosmtplib only when every reply was read and nothing else arrived, and is closed
    otherwise (a reply read out of step would be taken for the next message's)."""
    protocol = smtp.protocol
    if protocol is None or protocol.transport is None or protocol.transport.is_closing():
        raise aiosmtplib.SMTPServerDisconnected("Server not connected")
    # A cast, not an isinstance check: uvloop's transports are none of asyncio's transport classes.
    transport = cast(asyncio.Transport, protocol.transport)
    commands = [_command_line(b"MAIL FROM:", envelope.mail_from, options, encoding)]
    commands += [_command_line(b"RCPT TO:", r, [], encoding) for r in envelope.recipients]
    commands.append(b"DATA\r\n")
    reader = _ReplyReader(smtp.timeout)
    transport.set_protocol(reader)
    in_step = False
    reset = False
    try:
        transport.write(b"".join(commands))
        outcomes, in_step, reset = await _pipelined_replies(reader, transport, envelope, data, where)
        return outcomes
    finally:
        if in_step and reader.idle and not transport.is_closing():
            transport.set_protocol(protocol)
            if reset:
                await _reset(smtp)
        else:
            smtp.close()


async def _pipelined_replies(
    reader: _ReplyReader,
    transport: asyncio.Transport,
    envelope: Envelope,
    data: bytes,
    where: dict[str, str],
) -> tuple[dict[str, Outcome], bool, bool]:
    """The outcomes, whether the session is in step, and whether it needs an RSET."""
    mail = await reader.read()
    if mail.code != 250:
        refused = reply_outcome(mail.code, mail.message, **where)
        in_step = await _after_refused_mail(reader, transport, len(envelope.recipients))
        return dict.fromkeys(envelope.recipients, refused), in_step, in_step
    outcomes: dict[str, Outcome] = {}
    accepted: list[str] = []
    for recipient in envelope.recipients:
        reply = await reader.read()
        if reply.code in (250, 251):
            accepted.append(recipient)
        else:
            outcomes[recipient] = reply_outcome(reply.code, reply.message, **where)
    try:
        data_reply = await reader.read()
        if data_reply.code != 354:
            if accepted:
                final = reply_outcome(data_reply.code, data_reply.message, **where)
                outcomes.update(dict.fromkeys(accepted, final))
            return outcomes, True, True
        if not accepted:
            # RFC 2920 3.1: DATA accepted with no recipient: a lone dot ends it, nothing is sent.
            transport.write(b".\r\n")
            await reader.read()
            return outcomes, False, False
        transport.write(data_payload(data))
        reply = await reader.read()
    except (*_LOST, aiosmtplib.SMTPResponseException) as exc:
        if accepted:
            # The message may or may not have been taken: retrying risks a duplicate, never a loss.
            lost = failure_outcome(f"connection lost during DATA: {exc}", **where)
            outcomes.update(dict.fromkeys(accepted, lost))
        return outcomes, False, False
    outcomes.update(dict.fromkeys(accepted, reply_outcome(reply.code, reply.message, **where)))
    return outcomes, True, reply.code != 250


async def _after_refused_mail(reader: _ReplyReader, transport: asyncio.Transport, recipients: int) -> bool:
    """Reads the RCPT and DATA replies following a refused MAIL FROM (RFC 2920 expects them all
    refused): whether the session is still in step."""
    try:
        replies = [await reader.read() for _ in range(recipients)]
        data_reply = await reader.read()
    except (*_LOST, aiosmtplib.SMTPResponseException):
        return False
    if data_reply.code == 354:  # RFC 2920 3.1: a DATA accepted anyway is ended by a lone dot
        transport.write(b".\r\n")
        return False
    return all(r.code >= 300 for r in replies)


async def _reset(smtp: aiosmtplib.SMTP) -> None:
    try:
        await smtp.rset()
    except (aiosmtplib.SMTPException, OSError):
        smtp.close()


class SmtpTransport:
    """Delivery over SMTP to each domain's MX hosts, or (smarthost) to one relay for every domain."""

    groups_by_domain = True

    def __init__(
        self,
        pool: SmtpPool,
        *,
        resolver: MxResolver | None = None,
        port: int = 25,
        smarthost: tuple[str, int] | None = None,
    ) -> None:
        if (resolver is None) == (smarthost is None):
            raise ValueError("give either an MX resolver or a smarthost")
        self.pool = pool
        self.resolver = resolver
        self.port = port
        self.smarthost = smarthost

    async def _destinations(self, domain: str) -> list[Destination]:
        if self.smarthost is not None:
            host, port = self.smarthost
            return [Destination(host, host, port)]
        assert self.resolver is not None
        hosts = await self.resolver.resolve(domain)
        return [Destination(h.name, address, self.port) for h in hosts for address in h.addresses]

    async def deliver(self, envelope: Envelope, data: bytes) -> dict[str, Outcome]:
        try:
            destinations = await self._destinations(envelope.domain)
        except RouteError as exc:
            kind = Kind.PERMANENT if exc.permanent else Kind.TRANSIENT
            code = 550 if exc.permanent else 451
            outcome = Outcome(
                kind,
                f"{code} {exc.status} {exc}",
                exc.status,
                delay_type="" if exc.permanent else DELAY_COMMUNICATION,
            )
            return dict.fromkeys(envelope.recipients, outcome)
        last_failure = "no destination"
        last_dest: Destination | None = None
        for dest in destinations:
            for _ in range(2):  # a reused session the server has meanwhile closed is retried once, fresh
                reused = False
                try:
                    async with self.pool.session(dest, envelope.require_tls) as conn:
                        reused = conn.messages > 0
                        return await _transaction(conn, envelope, data, dest)
                except ConnectError as exc:
                    last_failure, last_dest = str(exc), dest
                    break  # next address or MX host
                except (TimeoutError, aiosmtplib.SMTPException, OSError) as exc:
                    last_failure, last_dest = f"{dest.host} [{dest.address}]: {exc}", dest
                    if not reused:
                        break
        outcome = failure_outcome(
            last_failure,
            remote_mta=last_dest.host if last_dest else "",
            remote_ip=last_dest.address if last_dest else "",
        )
        return dict.fromkeys(envelope.recipients, outcome)

    async def close(self) -> None:
        await self.pool.close()
