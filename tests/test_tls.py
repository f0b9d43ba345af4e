"""gRPC over TLS: clients check the server, services call each other over TLS, mutual TLS refuses a
client without a certificate, a renewed certificate is served without a restart, and Kubernetes' plain
text probes get a health-only port."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from postmesh.client import Client
from postmesh.identity.v1 import identity_pb2
from tests.conftest import MeshFactory
from tests.tls_helpers import TestCa

WHOAMI = identity_pb2.GetCallerIdentityRequest()


def _tls_settings(ca: TestCa, *, mutual: bool = False) -> dict[str, str]:
    server = ca.issue("server", ["postmesh.test", "localhost", "127.0.0.1"])
    settings = {
        "grpc_tls_cert_file": server.cert_file,
        "grpc_tls_key_file": server.key_file,
        # Services call each other (here: this very process) over TLS, checked against the same CA.
        "grpc_tls_ca_file": ca.ca_file,
        "health_listen": "127.0.0.1:0",
    }
    if mutual:
        settings["grpc_tls_client_ca_file"] = ca.ca_file
    return settings


def test_clients_reach_the_mesh_over_tls_and_services_call_each_other_over_it(
    start_mesh: MeshFactory, tmp_path: Path
) -> None:
    ca = TestCa(tmp_path / "ca")
    running = start_mesh(**_tls_settings(ca))
    account_id, key = running.create_account()
    # GetCallerIdentity authenticates the key with the identity service: a call between services.
    with Client(running.address, key, ca_file=ca.ca_file, server_name="postmesh.test") as client:
        assert client.identity.GetCallerIdentity(WHOAMI, timeout=10).account.account_id == account_id

    # Plain text is refused, and so is a server the client's CA did not sign.
    with Client(running.address, key) as plain, pytest.raises(grpc.RpcError) as refused:
        plain.identity.GetCallerIdentity(WHOAMI, timeout=5)
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
    other = TestCa(tmp_path / "other", "another CA")
    with Client(running.address, key, ca_file=other.ca_file) as wrong, pytest.raises(grpc.RpcError):
        wrong.identity.GetCallerIdentity(WHOAMI, timeout=5)


def test_health_only_port_in_plain_text_for_probes(start_mesh: MeshFactory, tmp_path: Path) -> None:
    ca = TestCa(tmp_path / "ca")
    running = start_mesh(**_tls_settings(ca))
    assert running.server is not None and running.server.health_port
    with grpc.insecure_channel(f"127.0.0.1:{running.server.health_port}") as channel:
        health = health_pb2_grpc.HealthStub(channel)
        reply = health.Check(
            health_pb2.HealthCheckRequest(service="postmesh.identity.v1.IdentityService"), timeout=5
        )
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
        # Nothing but health: the API stays behind TLS.
        method = "/postmesh.identity.v1.IdentityService/GetCallerIdentity"
        whoami: grpc.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary(method)
        with pytest.raises(grpc.RpcError) as unimplemented:
            whoami(WHOAMI.SerializeToString(), timeout=5)
        assert unimplemented.value.code() == grpc.StatusCode.UNIMPLEMENTED


def test_mutual_tls_refuses_a_client_without_a_certificate(start_mesh: MeshFactory, tmp_path: Path) -> None:
    ca = TestCa(tmp_path / "ca")
    running = start_mesh(**_tls_settings(ca, mutual=True))
    account_id, key = running.create_account()
    client_cert = ca.issue("client", ["app.test"], client=True)
    with Client(
        running.address,
        key,
        ca_file=ca.ca_file,
        cert_file=client_cert.cert_file,
        key_file=client_cert.key_file,
    ) as client:
        assert client.identity.GetCallerIdentity(WHOAMI, timeout=10).account.account_id == account_id
    with Client(running.address, key, ca_file=ca.ca_file) as anonymous, pytest.raises(grpc.RpcError):
        anonymous.identity.GetCallerIdentity(WHOAMI, timeout=5)


def test_a_renewed_certificate_is_served_without_a_restart(start_mesh: MeshFactory, tmp_path: Path) -> None:
    old_ca = TestCa(tmp_path / "old", "old CA")
    settings = _tls_settings(old_ca)
    running = start_mesh(**settings)
    new_ca = TestCa(tmp_path / "new", "new CA")
    renewed = new_ca.issue("renewed", ["postmesh.test", "localhost", "127.0.0.1"])
    # As cert-manager renews a Secret: both files replaced. The services keep calling each other
    # with the old CA here, so the new certificate must also be trusted by it: give them both.
    bundle = Path(settings["grpc_tls_ca_file"])
    bundle.write_bytes(bundle.read_bytes() + Path(new_ca.ca_file).read_bytes())
    shutil.copyfile(renewed.key_file, settings["grpc_tls_key_file"])
    shutil.copyfile(renewed.cert_file, settings["grpc_tls_cert_file"])
    later = time.time() + 5
    os.utime(settings["grpc_tls_cert_file"], (later, later))
    deadline = time.monotonic() + 30
    while True:
        # A new connection (a new client) sees the new certificate.
        with Client(running.address, running.admin_key, ca_file=new_ca.ca_file) as admin:
            try:
                admin.identity.ListAccounts(identity_pb2.ListAccountsRequest(), timeout=5)
                break
            except grpc.RpcError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)
