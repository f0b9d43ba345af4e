"""A DNS server on loopback serving the records a test publishes (dnslib), UDP and TCP."""

from __future__ import annotations

import socket
import threading
from typing import Any

from dnslib import MX, QTYPE, RCODE, RR, TXT
from dnslib.server import BaseResolver, DNSServer


def _free_port() -> int:
    # The same number must be free for UDP and TCP.
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


class _Resolver(BaseResolver):
    def __init__(self, zone: LocalDns) -> None:
        self.zone = zone

    def resolve(self, request: Any, handler: Any) -> Any:
        reply = request.reply()
        name = str(request.q.qname).rstrip(".").lower()
        qtype = QTYPE[request.q.qtype]
        with self.zone.lock:
            if self.zone.failing:
                reply.header.rcode = RCODE.SERVFAIL
                return reply
            known = any(n == name for n, _ in self.zone.records)
            values = list(self.zone.records.get((name, qtype), []))
        if not known:
            reply.header.rcode = RCODE.NXDOMAIN
        for value in values:
            if qtype == "TXT":
                chunks = [value[i : i + 255] for i in range(0, len(value), 255)] or [""]
                reply.add_answer(RR(name, QTYPE.TXT, rdata=TXT(chunks), ttl=0))
            elif qtype == "MX":
                preference, _, host = value.partition(" ")
                reply.add_answer(RR(name, QTYPE.MX, rdata=MX(host, int(preference)), ttl=0))
        return reply


class LocalDns:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.records: dict[tuple[str, str], list[str]] = {}
        self.failing = False
        self.port = _free_port()
        resolver = _Resolver(self)
        self._servers = [
            DNSServer(resolver, port=self.port, address="127.0.0.1", tcp=tcp, logger=_QuietLogger())
            for tcp in (False, True)
        ]

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> LocalDns:
        for server in self._servers:
            server.start_thread()
        return self

    def stop(self) -> None:
        for server in self._servers:
            server.stop()

    def __enter__(self) -> LocalDns:
        return self.start()

    def __exit__(self, *_: object) -> None:
        self.stop()

    def publish(self, name: str, rtype: str, value: str) -> None:
        with self.lock:
            self.records.setdefault((name.rstrip(".").lower(), rtype), []).append(value)

    def remove(self, name: str, rtype: str | None = None) -> None:
        with self.lock:
            for key in list(self.records):
                if key[0] == name.rstrip(".").lower() and (rtype is None or key[1] == rtype):
                    del self.records[key]


class _QuietLogger:
    def __getattr__(self, _name: str) -> Any:
        return lambda *args, **kwargs: None
