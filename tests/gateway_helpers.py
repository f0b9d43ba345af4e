"""The HTTP gateway on loopback in front of a test mesh, and boto3 clients for it."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import boto3
from botocore.config import Config

from postmesh.common.clients import MeshClients
from postmesh.common.config import SERVICE_NAMES
from postmesh.identity.v1 import identity_pb2
from postmesh.testing import MeshThread
from services.gateway.server import Gateway


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
