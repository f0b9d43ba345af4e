"""A small asyncio client of rspamd's normal worker: POST /checkv2 with the raw message, JSON back.

One request per connection (Connection: close), so no HTTP library is needed for this one call. A
refused connection, a timeout, a non-200 status or a body that is not rspamd's JSON all mean the
scanner is unavailable (the down-scanner rule then applies).
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass

from services.sender.filtration.clamd import Endpoint, ScannerUnavailable


@dataclass(frozen=True)
class SpamResult:
    score: float
    required_score: float
    # rspamd's own suggestion: "no action", "greylist", "add header", "rewrite subject", "reject"...
    action: str


def parse_result(status: int, body: bytes) -> SpamResult:
    if status != 200:
        raise ScannerUnavailable(f"rspamd answered HTTP {status}: {body[:200]!r}")
    try:
        data = json.loads(body)
        return SpamResult(
            score=float(data["score"]),
            required_score=float(data.get("required_score", 0.0)),
            action=str(data.get("action", "")),
        )
    except (ValueError, KeyError, TypeError) as exc:
        raise ScannerUnavailable(f"rspamd answered something unreadable: {body[:200]!r}") from exc


class RspamdClient:
    def __init__(self, url: str, *, timeout: float) -> None:
        self.endpoint = Endpoint.parse(url.removeprefix("http://"), 11333)
        self.timeout = timeout

    async def check(self, message: bytes, *, sender: str, recipients: list[str], queue_id: str) -> SpamResult:
        # The envelope goes along as rspamd's request headers; the message is outgoing, so it is
        # not checked against the sender's own SPF as inbound mail would be.
        headers = [
            "POST /checkv2 HTTP/1.1",
            f"Host: {self.endpoint.host or 'localhost'}",
            "Connection: close",
            f"Content-Length: {len(message)}",
            f"From: {sender}",
            f"Queue-Id: {queue_id}",
            *(f"Rcpt: {r}" for r in recipients[:50]),
        ]
        request = ("\r\n".join(headers) + "\r\n\r\n").encode("utf-8", "replace") + message
        try:
            async with asyncio.timeout(self.timeout):
                reader, writer = await self.endpoint.connect()
                try:
                    writer.write(request)
                    await writer.drain()
                    response = await reader.read()
                finally:
                    writer.close()
        except TimeoutError as exc:
            raise ScannerUnavailable(
                f"rspamd at {self.endpoint} did not answer within {self.timeout}s"
            ) from exc
        except OSError as exc:
            raise ScannerUnavailable(f"rspamd at {self.endpoint}: {exc!r}") from exc
        return parse_result(*_split_response(response))

    async def ping(self) -> bool:
        try:
            async with asyncio.timeout(self.timeout):
                reader, writer = await self.endpoint.connect()
                try:
                    writer.write(b"GET /ping HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
                    await writer.drain()
                    status, _ = _split_response(await reader.read())
                    return status == 200
                finally:
                    writer.close()
        except (OSError, TimeoutError, ScannerUnavailable):
            return False


def _split_response(response: bytes) -> tuple[int, bytes]:
    head, sep, body = response.partition(b"\r\n\r\n")
    status_line = head.split(b"\r\n", 1)[0].split()
    if not sep or len(status_line) < 2 or not status_line[1].isdigit():
        raise ScannerUnavailable(f"rspamd answered something that is not HTTP: {response[:200]!r}")
    if b"chunked" in head.lower() and b"transfer-encoding" in head.lower():
        body = _unchunk(body)
    return int(status_line[1]), body


def _unchunk(body: bytes) -> bytes:
    out = bytearray()
    while body:
        size_line, _, rest = body.partition(b"\r\n")
        try:
            size = int(size_line.split(b";")[0], 16)
        except ValueError as exc:
            raise ScannerUnavailable("rspamd sent a malformed chunked body") from exc
        if size == 0:
            break
        out += rest[:size]
        body = rest[size + 2 :]
    return bytes(out)
