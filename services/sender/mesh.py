"""What the sender asks the other services before accepting a message, over gRPC.

The accept path (domain code) sees plain results and domain errors; this adapter is where the other
services' refusals are turned back into domain errors with their status, reason and message intact.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from grpc import aio

from postmesh.common.clients import MeshClients, domain_error_from
from postmesh.common.sendquota import Reservation, SendQuotaClient
from postmesh.feedback.v1 import feedback_pb2
from postmesh.identity.v1 import identity_pb2
from services.sender.accept import Authorization

# Internal calls are quick; a stuck peer must not hold a caller's request forever.
TIMEOUT = 10.0


@asynccontextmanager
async def _refusals_as_domain_errors() -> AsyncIterator[None]:
    try:
        yield
    except aio.AioRpcError as exc:
        raise domain_error_from(exc) from None


class MeshChecks:
    def __init__(self, clients: MeshClients) -> None:
        self._clients = clients
        self._quota = SendQuotaClient(clients)

    async def close(self) -> None:
        """Gives back quota leases still held (on shutdown)."""
        await self._quota.close()

    async def reserve(self, account_id: str, messages: int) -> Reservation:
        async with _refusals_as_domain_errors():
            return await self._quota.reserve(account_id, messages)

    async def release(self, reservation: Reservation, messages: int) -> None:
        async with _refusals_as_domain_errors():
            await self._quota.release(reservation, messages)

    async def authorize_sender(self, account_id: str, address: str, identity: str) -> Authorization:
        async with _refusals_as_domain_errors():
            reply = await self._clients.identity.AuthorizeSender(
                identity_pb2.AuthorizeSenderRequest(
                    account_id=account_id, from_address=address, from_identity=identity
                ),
                timeout=TIMEOUT,
            )
        return Authorization(reply.identity, reply.identity_owner_account_id, reply.mail_from_domain)

    async def unverified_recipients(self, account_id: str, addresses: list[str]) -> list[str]:
        async with _refusals_as_domain_errors():
            reply = await self._clients.identity.CheckVerifiedRecipients(
                identity_pb2.CheckVerifiedRecipientsRequest(account_id=account_id, email_addresses=addresses),
                timeout=TIMEOUT,
            )
        return list(reply.unverified)

    async def suppressed(self, account_id: str, addresses: list[str]) -> list[str]:
        async with _refusals_as_domain_errors():
            reply = await self._clients.feedback.CheckSuppressedDestinations(
                feedback_pb2.CheckSuppressedDestinationsRequest(
                    account_id=account_id, email_addresses=addresses
                ),
                timeout=TIMEOUT,
            )
        return [s.email_address for s in reply.suppressed]
