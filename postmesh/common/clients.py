"""gRPC clients one service uses to call another, carrying the service credential.

Even when all four services share a process, they call each other through these clients, so the
all-in-one shape and the one-Deployment-per-service shape behave alike.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import grpc
from grpc import aio

from postmesh.client import error_details
from postmesh.common import tracing
from postmesh.common.auth import ACCOUNT_HEADER
from postmesh.common.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    PostmeshError,
    ResourceExhausted,
    Unauthenticated,
    Unavailable,
)
from postmesh.common.logging import REQUEST_ID_HEADER, request_id_var
from postmesh.common.tls import target_name_options
from postmesh.feedback.v1 import feedback_pb2_grpc
from postmesh.identity.v1 import identity_pb2_grpc
from postmesh.quota.v1 import quota_pb2_grpc
from postmesh.sender.v1 import sender_pb2_grpc

if TYPE_CHECKING:  # the async stub types exist only in the generated .pyi stubs
    from postmesh.feedback.v1.feedback_pb2_grpc import FeedbackServiceAsyncStub
    from postmesh.identity.v1.identity_pb2_grpc import IdentityServiceAsyncStub
    from postmesh.quota.v1.quota_pb2_grpc import QuotaServiceAsyncStub
    from postmesh.sender.v1.sender_pb2_grpc import SenderServiceAsyncStub


class _CredentialInterceptor(aio.UnaryUnaryClientInterceptor):
    def __init__(self, token: str) -> None:
        self._token = token

    async def intercept_unary_unary(
        self, continuation: Callable[..., Any], client_call_details: aio.ClientCallDetails, request: Any
    ) -> Any:
        metadata = list(client_call_details.metadata or [])
        if not any(key == "authorization" for key, _ in metadata):
            metadata.append(("authorization", f"Bearer {self._token}"))
        # The request id of the call being served goes along, so the called service logs under it
        # too and one request's lines join across the mesh.
        request_id = request_id_var.get()
        if request_id and not any(key == REQUEST_ID_HEADER for key, _ in metadata):
            metadata.append((REQUEST_ID_HEADER, request_id))
        if tracing.enabled():
            # W3C trace context: the called service's span continues this call's trace.
            carrier: dict[str, str] = {}
            tracing.inject(carrier)
            metadata.extend(carrier.items())
        details = aio.ClientCallDetails(
            client_call_details.method,
            client_call_details.timeout,
            aio.Metadata(*metadata),
            client_call_details.credentials,
            client_call_details.wait_for_ready,
        )
        return await continuation(details, request)


def for_account(account_id: str) -> tuple[tuple[str, str], ...]:
    """Call metadata that makes a service-credential call act for one account."""
    return ((ACCOUNT_HEADER, account_id),)


class MeshClients:
    """Lazily opened channels to the other services (or this process's own port)."""

    def __init__(
        self,
        endpoints: dict[str, str],
        service_key: str,
        *,
        credentials: grpc.ChannelCredentials | None = None,
        server_name: str = "",
    ) -> None:
        self._endpoints = endpoints
        self._service_key = service_key
        # Set: the other services are reached over TLS (postmesh.common.tls), checked for server_name.
        self._credentials = credentials
        self._server_name = server_name
        self._channels: dict[str, aio.Channel] = {}

    @property
    def endpoints(self) -> dict[str, str]:
        """host:port of each service (the same port for all in the all-in-one shape)."""
        return dict(self._endpoints)

    def channel(self, service: str) -> aio.Channel:
        if service not in self._channels:
            # round_robin: with a name that resolves to every replica (a headless Service), each
            # call goes to the next one instead of pinning this caller to the first.
            options: list[tuple[str, Any]] = [
                ("grpc.enable_retries", 1),
                ("grpc.keepalive_time_ms", 30_000),
                ("grpc.lb_policy_name", "round_robin"),
            ]
            interceptors = [_CredentialInterceptor(self._service_key)]
            target = self._endpoints[service]
            if self._credentials is None:
                channel = aio.insecure_channel(target, options=options, interceptors=interceptors)
            else:
                options += target_name_options(self._server_name)
                channel = aio.secure_channel(
                    target, self._credentials, options=options, interceptors=interceptors
                )
            self._channels[service] = channel
        return self._channels[service]

    @property
    def identity(self) -> IdentityServiceAsyncStub:
        return identity_pb2_grpc.IdentityServiceStub(self.channel("identity"))

    @property
    def quota(self) -> QuotaServiceAsyncStub:
        return quota_pb2_grpc.QuotaServiceStub(self.channel("quota"))

    @property
    def sender(self) -> SenderServiceAsyncStub:
        return sender_pb2_grpc.SenderServiceStub(self.channel("sender"))

    @property
    def feedback(self) -> FeedbackServiceAsyncStub:
        return feedback_pb2_grpc.FeedbackServiceStub(self.channel("feedback"))

    async def close(self) -> None:
        for channel in self._channels.values():
            await channel.close()
        self._channels.clear()


def status_code_of(exc: BaseException) -> grpc.StatusCode | None:
    return exc.code() if isinstance(exc, aio.AioRpcError) else None


def domain_error_from(exc: aio.AioRpcError) -> PostmeshError:
    """The same error, as a domain error, so a service can pass another service's refusal on to its
    own caller with the original status, reason and message."""
    details = error_details(exc)
    error_class = _ERROR_BY_CODE.get(details.code.name, Unavailable)
    # PostmeshError's own constructor: the subclasses' ones take narrower arguments.
    error = error_class.__new__(error_class)
    PostmeshError.__init__(
        error,
        details.message,
        reason=details.reason or error_class.default_reason,
        metadata=details.metadata,
        retry_after_seconds=details.retry_after_seconds,
    )
    return error


_ERROR_BY_CODE: dict[str, type[PostmeshError]] = {
    cls.code.value: cls
    for cls in (
        InvalidArgument,
        NotFound,
        AlreadyExists,
        PermissionDenied,
        Unauthenticated,
        FailedPrecondition,
        ResourceExhausted,
        Unavailable,
    )
}
