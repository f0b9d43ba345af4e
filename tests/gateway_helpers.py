"""The HTTP gateway on loopback in front of a test mesh, boto3 clients for it, and what the boto3
tests share: the loopback DNS zone, their own nats-server, verifying a domain now."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import boto3
import pytest
from botocore.config import Config
from botocore.exceptions import ClientError

from postmesh.common.clients import MeshClients
from postmesh.common.config import SERVICE_NAMES
from postmesh.identity.v1 import identity_pb2
from postmesh.testing import MeshThread
from postmesh.testing_mail import LoopbackDns
from services.gateway.server import Gateway
from tests.identity_helpers import publish
from tests.sending_helpers import own_nats_server


@pytest.fixture
def zone() -> Iterator[LoopbackDns]:
    with LoopbackDns() as server:
        yield server


@pytest.fixture
def nats_url(tmp_path: Path) -> Iterator[str]:
    """A nats-server of the test's own (JetStream state never shared with other tests)."""
    with own_nats_server(tmp_path / "nats") as url:
        yield url


@contextmanager
def running_gateway(mesh: MeshThread, **options: Any) -> Iterator[Gateway]:
    clients = MeshClients(dict.fromkeys(SERVICE_NAMES, mesh.address), mesh.service_key)
    gateway = Gateway(listen="127.0.0.1:0", clients=clients, **options)
    mesh.run(gateway.start())
    try:
        yield gateway
    finally:
        mesh.run(gateway.stop())
        mesh.run(clients.close())


def access_key(mesh: MeshThread, api_key: str) -> tuple[str, str]:
    with mesh.client(api_key) as client:
        reply = client.identity.CreateAccessKey(identity_pb2.CreateAccessKeyRequest(description="boto3"))
    return reply.access_key.access_key_id, reply.secret_access_key


def boto(service: str, gateway: Gateway, key: tuple[str, str], region: str = "eu-central-1") -> Any:
    return boto3.client(
        service,
        endpoint_url=gateway.url,
        region_name=region,
        aws_access_key_id=key[0],
        aws_secret_access_key=key[1],
        config=Config(retries={"max_attempts": 1}, connect_timeout=10, read_timeout=60),
    )


def verify_domain(mesh: MeshThread, api_key: str, zone: LoopbackDns, domain: str) -> None:
    """Publishes the identity's records in the loopback DNS and has identity check them now (SES has
    no API for that: its checker runs by itself)."""
    with mesh.client(api_key) as client:
        identity = client.identity.GetEmailIdentity(
            identity_pb2.GetEmailIdentityRequest(email_identity=domain)
        )
        publish(zone, identity.dns_records)
        client.identity.CheckEmailIdentityVerification(
            identity_pb2.CheckEmailIdentityVerificationRequest(email_identity=domain)
        )


def wait_for(condition: Any, within: float = 60.0) -> Any:
    """The condition's first true value, polled; its last value once `within` seconds have passed."""
    deadline = time.monotonic() + within
    while True:
        value = condition()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(0.2)


def error_code(call: Any) -> tuple[str, int]:
    """The SES error code and HTTP status the call fails with."""
    with pytest.raises(ClientError) as excinfo:
        call()
    response = excinfo.value.response
    return response["Error"]["Code"], response["ResponseMetadata"]["HTTPStatusCode"]
