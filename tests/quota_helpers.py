"""Helpers for the quota tests: an injected clock, and sender replicas with their own gRPC clients."""

from __future__ import annotations

import asyncio
import datetime as dt
import threading
import time
from dataclasses import dataclass, field

from postmesh.common.clients import MeshClients
from postmesh.common.errors import PostmeshError, ResourceExhausted
from postmesh.common.sendquota import SendQuotaClient


class ManualClock:
    """A clock that moves only when told to (thread-safe: the mesh reads it on its own thread)."""

    def __init__(self, start: dt.datetime) -> None:
        self._now = start
        self._lock = threading.Lock()

    def now(self) -> dt.datetime:
        with self._lock:
            return self._now

    def advance(self, **delta: float) -> dt.datetime:
        with self._lock:
            self._now += dt.timedelta(**delta)
            return self._now


@dataclass
class ReplicaResult:
    accepted: int = 0
    refused: int = 0
    reasons: dict[str, int] = field(default_factory=dict)
    last_accept: float = 0.0


class SenderReplica:
    """What a sender replica uses to reserve quota: its own event loop, its own MeshClients (its own
    gRPC channel to the quota service) and its own SendQuotaClient."""

    def __init__(self, quota_address: str, service_key: str) -> None:
        self._address = quota_address
        self._service_key = service_key

    def offer(
        self, account_id: str, *, per_second: float, seconds: float, start_at: float, result: ReplicaResult
    ) -> threading.Thread:
        """Offers one-recipient messages at `per_second` from `start_at` (time.monotonic) for `seconds`."""

        async def one(quota: SendQuotaClient) -> None:
            try:
                await quota.reserve(account_id, 1)
            except ResourceExhausted as exc:
                result.refused += 1
                result.reasons[exc.reason] = result.reasons.get(exc.reason, 0) + 1
                return
            result.accepted += 1
            result.last_accept = time.monotonic()

        async def main() -> None:
            clients = MeshClients({"quota": self._address}, self._service_key)
            quota = SendQuotaClient(clients)
            tasks = []
            count = int(per_second * seconds)
            for i in range(count):
                delay = start_at + i / per_second - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
                if time.monotonic() >= start_at + seconds:
                    break
                tasks.append(asyncio.create_task(one(quota)))
            await asyncio.gather(*tasks)
            await quota.close()
            await clients.close()

        thread = threading.Thread(target=asyncio.run, args=(main(),), daemon=True)
        thread.start()
        return thread

    def burst(self, account_id: str, count: int) -> ReplicaResult:
        """`count` concurrent one-recipient reservations; every lease given back before returning."""
        result = ReplicaResult()

        async def main() -> None:
            clients = MeshClients({"quota": self._address}, self._service_key)
            quota = SendQuotaClient(clients)

            async def one() -> None:
                try:
                    await quota.reserve(account_id, 1)
                    result.accepted += 1
                except PostmeshError as exc:
                    result.refused += 1
                    result.reasons[exc.reason] = result.reasons.get(exc.reason, 0) + 1

            await asyncio.gather(*(one() for _ in range(count)))
            await quota.close()
            await clients.close()

        asyncio.run(main())
        return result
