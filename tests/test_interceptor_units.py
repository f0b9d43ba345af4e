"""MeshInterceptor without a server: the wrapper it keeps per method, and what it does not keep."""

from __future__ import annotations

import asyncio
from typing import Any, NamedTuple

import grpc
import pytest

from postmesh.common.auth import Access, Principal, PrincipalKind
from postmesh.common.errors import Unauthenticated
from postmesh.common.server import MeshInterceptor

METHOD = "/postmesh.sender.v1.SenderService/SendEmail"


class _Details(NamedTuple):
    method: str
    invocation_metadata: tuple[tuple[str, str], ...]


class _Aborted(Exception):
    pass


class _Context:
    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        return ()

    def code(self) -> None:
        return None

    async def abort(self, code: grpc.StatusCode, message: str, trailing_metadata: Any = ()) -> None:
        raise _Aborted(code, message)


class _Runtime:
    def __init__(self) -> None:
        self.ready = asyncio.Event()
        self.ready.set()


class _Service:
    name = "sender"

    def __init__(self) -> None:
        self.runtime = _Runtime()

    def access_for(self, method: str) -> Access:
        return Access.ACCOUNT


class _Refusing:
    async def authenticate(self, metadata: dict[str, str], access: Access) -> Principal:
        if access is Access.PUBLIC:
            return Principal(PrincipalKind.ANONYMOUS)
        raise Unauthenticated("Missing API key.", reason="MISSING_API_KEY")


async def _done(request: bytes, context: Any) -> bytes:
    return b"done"


async def test_a_methods_wrapper_is_made_once_and_always_applies_the_policy() -> None:
    services: dict[str, Any] = {}
    interceptor = MeshInterceptor(services, _Refusing())  # type: ignore[arg-type]
    handler: grpc.RpcMethodHandler[Any, Any] = grpc.unary_unary_rpc_method_handler(_done)

    async def continuation(details: Any) -> Any:
        return handler

    async def call() -> bytes:
        wrapped = await interceptor.intercept_service(continuation, _Details(METHOD, ()))  # type: ignore[arg-type]
        assert wrapped is not None and wrapped.unary_unary is not None
        return await wrapped.unary_unary(b"request", _Context())  # type: ignore[arg-type]

    # Before its service is known (no postmesh policy applies) the handler is passed on as it is, and
    # that is not kept: once the service is there, every call goes through its policy.
    assert await call() == b"done"
    services["postmesh.sender.v1.SenderService"] = _Service()
    for _ in range(2):
        with pytest.raises(_Aborted) as refused:
            await call()
        assert refused.value.args[0] is grpc.StatusCode.UNAUTHENTICATED
    first = await interceptor.intercept_service(continuation, _Details(METHOD, ()))  # type: ignore[arg-type]
    again = await interceptor.intercept_service(continuation, _Details(METHOD, ()))  # type: ignore[arg-type]
    assert first is again and first is not handler
    # A new handler for the method (gRPC's, should it change) gets a wrapper of its own.
    handler = grpc.unary_unary_rpc_method_handler(_done)
    other = await interceptor.intercept_service(continuation, _Details(METHOD, ()))  # type: ignore[arg-type]
    assert other is not first and other is not handler
