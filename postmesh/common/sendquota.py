"""How a sender replica reserves send quota from the quota service (over gRPC).

The sender calls reserve() before queuing a message (one unit per recipient) and release() for what
it did not use. The quota service decides; this class is where a replica-side lease of tokens can
live, so that the quota service is not asked once per message.
"""

from __future__ import annotations

from dataclasses import dataclass

from postmesh.common.clients import MeshClients
from postmesh.quota.v1 import quota_pb2


@dataclass(frozen=True)
class Reservation:
    account_id: str
    reservation_id: str
    messages: int
    production_access: bool


class SendQuotaClient:
    def __init__(self, clients: MeshClients) -> None:
        self._clients = clients

    async def reserve(self, account_id: str, messages: int) -> Reservation:
        """Raises grpc.aio.AioRpcError (RESOURCE_EXHAUSTED, FAILED_PRECONDITION) when refused."""
        reply = await self._clients.quota.ReserveSendQuota(
            quota_pb2.ReserveSendQuotaRequest(account_id=account_id, messages=messages), timeout=10
        )
        return Reservation(account_id, reply.reservation_id, messages, reply.production_access_enabled)

    async def release(self, reservation: Reservation, messages: int | None = None) -> None:
        await self._clients.quota.ReleaseSendQuota(
            quota_pb2.ReleaseSendQuotaRequest(
                account_id=reservation.account_id,
                reservation_id=reservation.reservation_id,
                messages=reservation.messages if messages is None else messages,
            ),
            timeout=10,
        )
