"""One authenticated request's calls into the mesh: the service credential acting for the account
(the same RPCs, so every check stays where it is), with gRPC refusals turned into SES errors."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from grpc import aio

from postmesh.client import error_details
from postmesh.common.clients import MeshClients, for_account
from services.gateway.errors import ApiError, ses_error_for

R = TypeVar("R")

RPC_TIMEOUT_SECONDS = 60.0


class AccountCalls:
    def __init__(self, clients: MeshClients, account_id: str, request_id: str) -> None:
        self.clients = clients
        self.account_id = account_id
        self._metadata = (*for_account(account_id), ("x-request-id", request_id))

    async def __call__(self, method: Callable[..., Awaitable[R]], request: Any) -> R:
        try:
            return await method(request, metadata=self._metadata, timeout=RPC_TIMEOUT_SECONDS)
        except aio.AioRpcError as exc:
            raise rpc_error(exc) from None


def rpc_error(exc: aio.AioRpcError) -> ApiError:
    details = error_details(exc)
    return ApiError(ses_error_for(details.code.name, details.reason), details.message)
