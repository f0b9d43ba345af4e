"""A very small HTTP server for the link in verification messages (GET /confirm?token=...).

Plain asyncio streams: one request per connection, bounded sizes and time, no user input echoed back.
"""

from __future__ import annotations

import asyncio
import html
import logging
from collections.abc import Awaitable, Callable
from urllib.parse import parse_qs, urlsplit

from postmesh.common.errors import PostmeshError

log = logging.getLogger(__name__)

MAX_LINE = 4096
MAX_HEADERS = 64
READ_TIMEOUT = 10.0

Confirm = Callable[[str], Awaitable[str]]

_PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>{title}</title></head>
<body><h1>{title}</h1><p>{text}</p></body></html>
"""


def _response(status: str, title: str, text: str, *, head: bool = False) -> bytes:
    body = _PAGE.format(title=html.escape(title), text=html.escape(text)).encode()
    headers = [
        f"HTTP/1.1 {status}",
        "Content-Type: text/html; charset=utf-8",
        f"Content-Length: {len(body)}",
        "Cache-Control: no-store",
        "Content-Security-Policy: default-src 'none'",
        "X-Content-Type-Options: nosniff",
        "X-Frame-Options: DENY",
        # The token is in the URL: keep it out of Referer headers.
        "Referrer-Policy: no-referrer",
        "Connection: close",
    ]
    return ("\r\n".join(headers) + "\r\n\r\n").encode() + (b"" if head else body)


class ConfirmationServer:
    def __init__(self, listen: str, confirm: Confirm, *, reuse_port: bool = False) -> None:
        host, _, port = listen.rpartition(":")
        self._host = host.strip("[]") or "127.0.0.1"
        self._port = int(port)
        self._confirm = confirm
        self._reuse_port = reuse_port
        self._server: asyncio.Server | None = None
        self.port = 0

    async def start(self) -> int:
        self._server = await asyncio.start_server(
            self._handle, self._host, self._port, limit=MAX_LINE, reuse_port=self._reuse_port or None
        )
        self.port = self._server.sockets[0].getsockname()[1]
        return self.port

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(READ_TIMEOUT):
                response = await self._respond(reader)
            writer.write(response)
            await writer.drain()
        except (TimeoutError, ValueError, ConnectionError, asyncio.IncompleteReadError):
            pass  # a slow, oversized or broken request: just close
        except Exception:
            log.exception("confirmation request failed")
        finally:
            writer.close()

    async def _respond(self, reader: asyncio.StreamReader) -> bytes:
        request_line = (await reader.readline()).decode("latin-1").strip()
        for _ in range(MAX_HEADERS):
            if (await reader.readline()) in (b"\r\n", b"\n", b""):
                break
        else:
            return _response("431 Request Header Fields Too Large", "Bad request", "Too many headers.")
        parts = request_line.split(" ")
        if len(parts) != 3 or not parts[2].startswith("HTTP/"):
            return _response("400 Bad Request", "Bad request", "Malformed request.")
        method, target, _ = parts
        head = method == "HEAD"
        if method not in ("GET", "HEAD"):
            return _response("405 Method Not Allowed", "Not allowed", "Only GET is served here.")
        url = urlsplit(target)
        if url.path == "/healthz":
            return _response("200 OK", "OK", "The identity service is up.", head=head)
        if url.path != "/confirm":
            return _response("404 Not Found", "Not found", "There is nothing here.", head=head)
        tokens = parse_qs(url.query).get("token", [])
        if len(tokens) != 1:
            return _response("400 Bad Request", "Bad request", "The link has no token.", head=head)
        if head:
            # Link scanners probe with HEAD: never spend the token on one.
            return _response("200 OK", "Confirm", "", head=True)
        try:
            identity = await self._confirm(tokens[0])
        except PostmeshError as exc:
            status = (
                "410 Gone" if exc.reason in ("TOKEN_EXPIRED", "TOKEN_ALREADY_USED") else "400 Bad Request"
            )
            return _response(status, "Not confirmed", exc.message)
        return _response(
            "200 OK", "Address verified", f"{identity} is verified: postmesh may now send from it."
        )
