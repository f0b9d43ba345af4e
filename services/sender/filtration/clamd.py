"""A small asyncio client of clamd's INSTREAM command, over TCP or a Unix socket.

The protocol (clamd(8)): "zINSTREAM\\0", then chunks each prefixed with its length as a 4-byte
big-endian integer, then a zero-length chunk; clamd answers one NUL-terminated line:
"stream: OK", "stream: <signature> FOUND", or "<text> ERROR". A reply that is none of these, a
refused connection or no reply within the timeout all mean the scanner is unavailable: the caller
then applies the down-scanner rule, it never takes silence for a clean result.
"""

from __future__ import annotations

import asyncio
import re
import struct
from dataclasses import dataclass

# clamd's own answer when the stream passes its StreamMaxLength; reported as a finding (see verdict).
SIZE_LIMIT_SIGNATURE = "Heuristics.Limits.Exceeded.StreamMaxLength"
_CHUNK = 64 * 1024
_FOUND = re.compile(r"stream: (\S+(?: \S+)*?) FOUND")


class ScannerUnavailable(Exception):
    """The scanner could not give a verdict (down, hung, or answering something unreadable)."""


@dataclass(frozen=True)
class Endpoint:
    host: str = ""
    port: int = 0
    path: str = ""  # a Unix socket when set

    @classmethod
    def parse(cls, url: str, default_port: int) -> Endpoint:
        """tcp://host:port, unix:///path/clamd.ctl, host:port or host."""
        url = url.strip()
        if url.startswith("unix://"):
            return cls(path=url.removeprefix("unix://"))
        url = url.removeprefix("tcp://").rstrip("/")
        host, sep, port = url.rpartition(":")
        if not sep or not port.isdigit():
            return cls(host=url.strip("[]"), port=default_port)
        return cls(host=host.strip("[]"), port=int(port))

    async def connect(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        if self.path:
            return await asyncio.open_unix_connection(self.path)
        return await asyncio.open_connection(self.host, self.port)

    def __str__(self) -> str:
        return f"unix://{self.path}" if self.path else f"{self.host}:{self.port}"


def parse_reply(reply: bytes) -> str | None:
    """The signature clamd found, or None when clean; ScannerUnavailable for anything else."""
    text = reply.rstrip(b"\0\n").decode("utf-8", "replace").strip()
    if text == "stream: OK":
        return None
    found = _FOUND.fullmatch(text)
    if found:
        return found.group(1)
    if text.startswith("INSTREAM size limit exceeded"):
        return SIZE_LIMIT_SIGNATURE
    raise ScannerUnavailable(f"clamd answered {text[:200]!r}")


class ClamdClient:
    def __init__(self, url: str, *, timeout: float, max_stream_bytes: int = 0) -> None:
        self.endpoint = Endpoint.parse(url, 3310)
        self.timeout = timeout
        # clamd's StreamMaxLength: a longer stream is cut off by clamd (which then closes the
        # connection, its answer often lost to the broken pipe), so it is judged here without
        # sending it: the same finding clamd would report. 0: no limit of our own.
        self.max_stream_bytes = max_stream_bytes

    async def ping(self) -> bool:
        try:
            async with asyncio.timeout(self.timeout):
                reader, writer = await self.endpoint.connect()
                try:
                    writer.write(b"zPING\0")
                    await writer.drain()
                    return (await reader.read(64)).rstrip(b"\0\n") == b"PONG"
                finally:
                    writer.close()
        except (OSError, TimeoutError):
            return False

    async def scan(self, data: bytes) -> str | None:
        """The signature of what clamd found in `data`, or None when it found nothing."""
        if self.max_stream_bytes and len(data) > self.max_stream_bytes:
            return SIZE_LIMIT_SIGNATURE
        try:
            async with asyncio.timeout(self.timeout):
                reader, writer = await self.endpoint.connect()
                try:
                    return parse_reply(await self._instream(reader, writer, data))
                finally:
                    writer.close()
        except TimeoutError as exc:
            raise ScannerUnavailable(
                f"clamd at {self.endpoint} did not answer within {self.timeout}s"
            ) from exc
        except (OSError, asyncio.IncompleteReadError) as exc:
            raise ScannerUnavailable(f"clamd at {self.endpoint}: {exc!r}") from exc

    async def _instream(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, data: bytes
    ) -> bytes:
        try:
            writer.write(b"zINSTREAM\0")
            view = memoryview(data)
            for start in range(0, len(view), _CHUNK):
                chunk = view[start : start + _CHUNK]
                writer.write(struct.pack(">I", len(chunk)))
                writer.write(chunk)
                await writer.drain()
            writer.write(struct.pack(">I", 0))
            await writer.drain()
        except (BrokenPipeError, ConnectionResetError):
            # clamd stops reading a stream past its StreamMaxLength and says so before closing.
            pass
        reply = await reader.read(4096)
        if not reply:
            raise ScannerUnavailable(f"clamd at {self.endpoint} closed the connection without a verdict")
        return reply
