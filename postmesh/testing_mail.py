"""Real mail peers on loopback for tests and `make bench`: aiosmtpd SMTP servers with chosen
behaviours, and a dnslib DNS server serving a small zone (MX, A, TXT) from memory."""

from __future__ import annotations

import asyncio
import re
import socket
import threading
from collections.abc import Iterable
from dataclasses import dataclass, field
from email import message_from_bytes
from email.message import Message
from typing import Any, cast

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, Envelope, Session
from dnslib import MX, QTYPE, RCODE, RR, TXT, A, DNSLabel, DNSRecord
from dnslib.server import BaseResolver, DNSHandler, DNSServer

from postmesh.common.natsserver import free_port


@dataclass
class Received:
    mail_from: str
    recipients: list[str]
    data: bytes
    peer: str
    tls: bool

    @property
    def message(self) -> Message:
        return message_from_bytes(self.data)

    @property
    def message_id(self) -> str:
        match = re.search(rb"^Message-ID:\s*(\S+)", self.data, re.IGNORECASE | re.MULTILINE)
        return match.group(1).decode() if match else ""


@dataclass
class Behaviour:
    """What the server answers. `reject` maps a recipient (lower case) to its RCPT reply;
    `defer_first` answers that many DATA commands with 451 before accepting.

    `pipelining` advertises PIPELINING (RFC 2920; aiosmtpd reads pipelined commands in order either
    way). `reject_mail` / `reject_data` answer MAIL FROM / DATA (instead of 354) with that reply;
    `data_without_recipients` answers DATA with 354 even when no RCPT was accepted (RFC 2920 3.1
    says a client must cope), refusing the empty message then. `hang_up_at` closes the connection
    instead of replying to "MAIL", "RCPT" (the one of `hang_up_rcpt`, or the first), "DATA" or "END"
    (the end of the message data, which is then not kept). `slow_rcpt` waits that many seconds before
    answering a recipient's RCPT."""

    reject: dict[str, str] = field(default_factory=dict)
    reject_all_rcpt: str = ""
    defer_first: int = 0
    defer_reply: str = "451 4.3.0 Try again later"
    pipelining: bool = False
    reject_mail: str = ""
    reject_data: str = ""
    data_without_recipients: bool = False
    hang_up_at: str = ""
    hang_up_rcpt: str = ""
    slow_rcpt: dict[str, float] = field(default_factory=dict)


class _Handler:
    def __init__(self, behaviour: Behaviour) -> None:
        self.behaviour = behaviour
        self.received: list[Received] = []
        self.deferred = 0
        self.data_commands = 0
        self.lock = threading.Lock()

    async def handle_EHLO(
        self, server: SMTP, session: Session, envelope: Envelope, hostname: str, responses: list[str]
    ) -> list[str]:
        session.host_name = hostname
        if self.behaviour.pipelining:
            return [*responses[:-1], "250-PIPELINING", responses[-1]]
        return responses

    async def handle_MAIL(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, mail_options: list[str]
    ) -> str:
        if self.behaviour.hang_up_at == "MAIL":
            return _hang_up(server)
        if self.behaviour.reject_mail:
            return self.behaviour.reject_mail
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return "250 OK"

    async def handle_RCPT(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, rcpt_options: list[str]
    ) -> str:
        if self.behaviour.hang_up_at == "RCPT" and self.behaviour.hang_up_rcpt in ("", address.lower()):
            return _hang_up(server)
        if address.lower() in self.behaviour.slow_rcpt:
            await asyncio.sleep(self.behaviour.slow_rcpt[address.lower()])
        refusal = self.behaviour.reject.get(address.lower()) or self.behaviour.reject_all_rcpt
        if refusal:
            return refusal
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        if self.behaviour.hang_up_at == "END":
            return _hang_up(server)
        with self.lock:
            self.data_commands += 1
            if self.deferred < self.behaviour.defer_first:
                self.deferred += 1
                return self.behaviour.defer_reply
            content = envelope.original_content or envelope.content or b""
            self.received.append(
                Received(
                    mail_from=envelope.mail_from or "",
                    recipients=list(envelope.rcpt_tos),
                    data=content if isinstance(content, bytes) else content.encode(),
                    peer=str(session.peer[0]) if session.peer else "",
                    tls=session.ssl is not None,
                )
            )
        return "250 2.0.0 OK queued"


def _hang_up(server: SMTP) -> str:
    assert server.transport is not None
    cast(asyncio.Transport, server.transport).abort()  # uvloop's transports are not asyncio's classes
    return "421 4.4.2 gone"  # written to a closed transport: never sent


class _Smtp(SMTP):
    """aiosmtpd's server with the DATA behaviours its hooks cannot express (they run after 354)."""

    def __init__(self, handler: _Handler, **kwargs: Any) -> None:
        super().__init__(handler, **kwargs)
        self.behaviour = handler.behaviour

    async def smtp_DATA(self, arg: str) -> None:
        behaviour = self.behaviour
        if behaviour.hang_up_at == "DATA":
            _hang_up(self)
            return
        if behaviour.reject_data and self.envelope is not None and self.envelope.rcpt_tos:
            await self.push(behaviour.reject_data)
            return
        if behaviour.data_without_recipients and self.envelope is not None and not self.envelope.rcpt_tos:
            await self.push("354 End data with <CR><LF>.<CR><LF>")
            while await self._reader.readuntil(b"\r\n") != b".\r\n":
                pass
            await self.push("554 5.5.1 Error: no valid recipients")
            return
        await super().smtp_DATA(arg)


class _Controller(Controller):
    def factory(self) -> SMTP:
        assert isinstance(self.handler, _Handler)
        return _Smtp(self.handler, **self.SMTP_kwargs)


class SmtpServer:
    """An aiosmtpd server on `host`:`port` (port 0: a free one) in its own thread."""

    def __init__(
        self, host: str = "127.0.0.1", port: int = 0, behaviour: Behaviour | None = None, **smtp_kwargs: Any
    ) -> None:
        self.handler = _Handler(behaviour or Behaviour())
        self.host = host
        self.port = port or free_port(host)
        self.controller = _Controller(
            self.handler, hostname=host, port=self.port, server_hostname="mx.test", **smtp_kwargs
        )

    @property
    def received(self) -> list[Received]:
        with self.handler.lock:
            return list(self.handler.received)

    def start(self) -> SmtpServer:
        self.controller.start()
        return self

    def stop(self) -> None:
        self.controller.stop()

    def __enter__(self) -> SmtpServer:
        return self.start()

    def __exit__(self, *_: object) -> None:
        self.stop()


class _ZoneResolver(BaseResolver):
    def __init__(self, zone: LoopbackDns) -> None:
        self.zone = zone

    def resolve(self, request: DNSRecord, handler: DNSHandler) -> DNSRecord:
        reply = request.reply()
        name = str(request.q.qname).rstrip(".").lower()
        qtype = QTYPE[request.q.qtype]
        with self.zone.lock:
            if self.zone.failing:
                reply.header.rcode = RCODE.SERVFAIL
                return reply
            known = name in self.zone.names
            records = list(self.zone.records.get((name, qtype), []))
        if not known:
            reply.header.rcode = RCODE.NXDOMAIN
        for rdata in records:
            reply.add_answer(RR(DNSLabel(name + "."), getattr(QTYPE, qtype), rdata=rdata, ttl=0))
        return reply


def _free_udp_and_tcp_port() -> int:
    # One number, free for both UDP and TCP: resolvers retry large answers over TCP.
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
            udp.bind(("127.0.0.1", 0))
            port = int(udp.getsockname()[1])
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as tcp:
                try:
                    tcp.bind(("127.0.0.1", port))
                except OSError:
                    continue
        return port


class LoopbackDns:
    """A DNS server on 127.0.0.1 (UDP and TCP) answering from the records a test publishes.
    Names it has never heard of are NXDOMAIN; known names without the asked type answer empty;
    `failing = True` makes every answer SERVFAIL (a resolver outage)."""

    def __init__(self) -> None:
        self.records: dict[tuple[str, str], list[Any]] = {}
        self.names: set[str] = set()
        self.failing = False
        self.lock = threading.Lock()
        self.port = _free_udp_and_tcp_port()
        resolver = _ZoneResolver(self)
        self._servers = [
            DNSServer(resolver, address="127.0.0.1", port=self.port, tcp=tcp, logger=_QuietLogger())
            for tcp in (False, True)
        ]

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _add(self, name: str, qtype: str, rdata: Any) -> None:
        name = name.rstrip(".").lower()
        with self.lock:
            self.names.add(name)
            self.records.setdefault((name, qtype), []).append(rdata)

    def add_name(self, name: str) -> None:
        with self.lock:
            self.names.add(name.rstrip(".").lower())

    def add_mx(self, domain: str, host: str, preference: int = 10) -> None:
        self._add(domain, "MX", MX(host if host == "." else host + ".", preference))

    def add_a(self, name: str, *addresses: str) -> None:
        for address in addresses:
            self._add(name, "A", A(address))

    def add_txt(self, name: str, text: str) -> None:
        # TXT character-strings hold at most 255 bytes: long records (DKIM keys) are split.
        self._add(name, "TXT", TXT([text[i : i + 255] for i in range(0, len(text), 255)] or [""]))

    def publish(self, name: str, rtype: str, value: str) -> None:
        """A record as a zone file writes it: TXT text, "10 mx.example.test" for MX, an A address."""
        if rtype == "TXT":
            self.add_txt(name, value)
        elif rtype == "MX":
            preference, _, host = value.partition(" ")
            self.add_mx(name, host.rstrip("."), int(preference))
        elif rtype == "A":
            self.add_a(name, value)
        else:
            raise ValueError(f"unsupported record type {rtype}")

    def remove(self, name: str, rtype: str | None = None) -> None:
        """Withdraws a name's records (of one type, or all); a name left with none is NXDOMAIN."""
        name = name.rstrip(".").lower()
        with self.lock:
            for key in [k for k in self.records if k[0] == name and (rtype is None or k[1] == rtype)]:
                del self.records[key]
            if not any(k[0] == name for k in self.records):
                self.names.discard(name)

    def start(self) -> LoopbackDns:
        for server in self._servers:
            server.start_thread()
        return self

    def stop(self) -> None:
        for server in self._servers:
            server.stop()

    def __enter__(self) -> LoopbackDns:
        return self.start()

    def __exit__(self, *_: object) -> None:
        self.stop()


class _QuietLogger:
    def __getattr__(self, name: str) -> Any:
        return lambda *args, **kwargs: None


def addresses(received: Iterable[Received]) -> list[str]:
    return [r for message in received for r in message.recipients]
