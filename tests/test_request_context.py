"""What a call carries across the mesh: its request id on every call between services, and the
reason a revoked key is refused."""

from __future__ import annotations

import logging

import grpc
import pytest

from postmesh.client import error_details
from postmesh.common.logging import request_id_var
from postmesh.identity.v1 import identity_pb2
from postmesh.quota.v1 import quota_pb2
from postmesh.testing import MeshThread


class _Recorder(logging.Handler):
    """(method, request id) of every RPC the server logs, read in the context that logs it."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.calls: list[tuple[str, str]] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.getMessage() == "rpc":
            self.calls.append((str(getattr(record, "method", "")), request_id_var.get()))


def test_the_request_id_goes_along_on_calls_between_services(mesh: MeshThread) -> None:
    _, key = mesh.create_account()
    server_log = logging.getLogger("postmesh.common.server")
    recorder = _Recorder()
    level = server_log.level
    server_log.addHandler(recorder)
    server_log.setLevel(logging.DEBUG)
    try:
        with mesh.client(key) as client:
            client.quota.GetAccount(quota_pb2.GetAccountRequest(), metadata=(("x-request-id", "trace-0123"),))
    finally:
        server_log.removeHandler(recorder)
        server_log.setLevel(level)
    traced = {method for method, request_id in recorder.calls if request_id == "trace-0123"}
    assert "/postmesh.quota.v1.QuotaService/GetAccount" in traced
    # The API key was checked by a call to identity: it logged under the same request id.
    assert "/postmesh.identity.v1.IdentityService/AuthenticateApiKey" in traced


def test_a_revoked_key_is_refused_as_revoked(mesh: MeshThread) -> None:
    _, key = mesh.create_account()
    with mesh.client(key) as client:
        second = client.identity.CreateApiKey(identity_pb2.CreateApiKeyRequest(description="ci"))
        client.identity.RevokeApiKey(identity_pb2.RevokeApiKeyRequest(key_id=second.api_key.key_id))
    with mesh.client(second.api_key_secret) as revoked:
        for call in (
            lambda: revoked.quota.GetAccount(quota_pb2.GetAccountRequest()),
            lambda: revoked.identity.GetCallerIdentity(identity_pb2.GetCallerIdentityRequest()),
        ):
            with pytest.raises(grpc.RpcError) as excinfo:
                call()
            details = error_details(excinfo.value)
            assert (details.code, details.reason) == (grpc.StatusCode.UNAUTHENTICATED, "API_KEY_REVOKED")
