"""Connections open now, in total and per client address, for the SMTP servers postmesh runs (the
submission server and the inbound listener): one client cannot take every slot."""

from __future__ import annotations

import asyncio
from collections import Counter
from typing import cast


class ConnectionLimits:
    """`max_total` connections at once, at most `max_per_client` from one address (0: no such limit)."""

    def __init__(self, max_total: int, max_per_client: int) -> None:
        self._max_total = max_total
        self._max_per_client = max_per_client
        self._open: Counter[str] = Counter()

    @property
    def total(self) -> int:
        return sum(self._open.values())

    def enter(self, client: str) -> bool:
        """Counts a new connection from `client`; False (and nothing counted) when over a limit."""
        if self.total >= self._max_total or (
            self._max_per_client > 0 and self._open[client] >= self._max_per_client
        ):
            return False
        self._open[client] += 1
        return True

    def leave(self, client: str) -> None:
        self._open[client] -= 1
        if self._open[client] <= 0:
            del self._open[client]


def say_and_close(transport: asyncio.BaseTransport, reply: str) -> None:
    """Writes one SMTP reply line and closes the connection (a refusal, a goodbye at shutdown).
    uvloop's transports implement asyncio's transport methods without being instances of its classes
    (isinstance(transport, asyncio.WriteTransport) is False there), hence a cast, not a check."""
    if transport.is_closing():
        return
    writer = cast(asyncio.WriteTransport, transport)
    writer.write(f"{reply}\r\n".encode())
    writer.close()
