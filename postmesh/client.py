"""The Python SDK: one Client with a stub per service, authenticated with an API key.

from postmesh.client import Client
client = Client()                     # POSTMESH_ENDPOINT, POSTMESH_API_KEY
client.identity.GetCallerIdentity(identity_pb2.GetCallerIdentityRequest())

Over TLS: Client(tls=True) checks the server against the system's roots; ca_file= (or POSTMESH_CA_FILE)
names a private CA, server_name= (POSTMESH_SERVER_NAME) the name its certificate must carry when it is
not the endpoint's host, and cert_file=/key_file= (POSTMESH_CLIENT_CERT/POSTMESH_CLIENT_KEY) a client
certificate for servers that require mutual TLS.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import grpc
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_status import rpc_status

from postmesh.common.tls import channel_credentials, target_name_options
from postmesh.feedback.v1 import feedback_pb2_grpc
from postmesh.identity.v1 import identity_pb2_grpc
from postmesh.quota.v1 import quota_pb2_grpc
from postmesh.sender.v1 import sender_pb2_grpc

DEFAULT_ENDPOINT = "localhost:50051"


class _ApiKeyInterceptor(grpc.UnaryUnaryClientInterceptor, grpc.StreamStreamClientInterceptor):
    def __init__(self, api_key: str) -> None:
        self._api_key = api_key

    def _with_key(self, client_call_details: Any) -> Any:
        metadata = list(client_call_details.metadata or [])
        metadata.append(("authorization", f"Bearer {self._api_key}"))
        return client_call_details._replace(metadata=metadata)

    def intercept_unary_unary(
        self, continuation: Callable[..., Any], client_call_details: Any, request: Any
    ) -> Any:
        return continuation(self._with_key(client_call_details), request)

    def intercept_stream_stream(
        self, continuation: Callable[..., Any], client_call_details: Any, request_iterator: Any
    ) -> Any:
        return continuation(self._with_key(client_call_details), request_iterator)


@dataclass(frozen=True)
class ErrorDetails:
    """What a postmesh error says: the status, the SES-like reason and its metadata."""

    code: grpc.StatusCode
    message: str
    reason: str
    metadata: dict[str, str]
    retry_after_seconds: float | None


def error_details(error: grpc.RpcError) -> ErrorDetails:
    reason, metadata, retry = "", {}, None
    status = rpc_status.from_call(error)
    if status is not None:
        for detail in status.details:
            if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
                info = error_details_pb2.ErrorInfo()
                detail.Unpack(info)
                reason, metadata = info.reason, dict(info.metadata)
            elif detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
                retry_info = error_details_pb2.RetryInfo()
                detail.Unpack(retry_info)
                retry = retry_info.retry_delay.ToMilliseconds() / 1000
    return ErrorDetails(error.code(), error.details() or "", reason, metadata, retry)


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in {"1", "true", "yes", "on"}


class Client:
    def __init__(
        self,
        endpoint: str | None = None,
        api_key: str | None = None,
        *,
        tls: bool | None = None,
        ca_file: str | None = None,
        server_name: str | None = None,
        cert_file: str | None = None,
        key_file: str | None = None,
    ) -> None:
        self.endpoint = endpoint or os.environ.get("POSTMESH_ENDPOINT") or DEFAULT_ENDPOINT
        self.api_key = api_key if api_key is not None else os.environ.get("POSTMESH_API_KEY", "")
        ca_file = ca_file if ca_file is not None else os.environ.get("POSTMESH_CA_FILE", "")
        server_name = server_name if server_name is not None else os.environ.get("POSTMESH_SERVER_NAME", "")
        cert_file = cert_file if cert_file is not None else os.environ.get("POSTMESH_CLIENT_CERT", "")
        key_file = key_file if key_file is not None else os.environ.get("POSTMESH_CLIENT_KEY", "")
        if tls is None:
            tls = _env_flag("POSTMESH_TLS") or bool(ca_file or server_name or cert_file)
        raw = (
            grpc.secure_channel(
                self.endpoint,
                channel_credentials(ca_file, cert_file, key_file),
                options=target_name_options(server_name),
            )
            if tls
            else grpc.insecure_channel(self.endpoint)
        )
        self._raw_channel = raw
        self.channel = grpc.intercept_channel(raw, _ApiKeyInterceptor(self.api_key)) if self.api_key else raw
        self.identity = identity_pb2_grpc.IdentityServiceStub(self.channel)
        self.quota = quota_pb2_grpc.QuotaServiceStub(self.channel)
        self.sender = sender_pb2_grpc.SenderServiceStub(self.channel)
        self.feedback = feedback_pb2_grpc.FeedbackServiceStub(self.channel)
        self.health = health_pb2_grpc.HealthStub(raw)

    def health_status(self, service: str = "", timeout: float = 5.0) -> str:
        reply = self.health.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
        return str(health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status))

    def wait_serving(self, timeout: float, *, exited: Callable[[], bool] = lambda: False) -> bool:
        """Asks the server's health until it says SERVING (True), `timeout` seconds pass or `exited()`
        says the server's process is gone (False): servers start without their port open yet."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                if self.health_status("", timeout=2) == "SERVING":
                    return True
            except grpc.RpcError:
                pass
            if exited() or time.monotonic() > deadline:
                return False
            time.sleep(0.2)

    def close(self) -> None:
        self._raw_channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()
