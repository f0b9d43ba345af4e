"""Running the gateway: `postmesh serve gateway` alone (it reaches the services at *_ENDPOINT), or
next to services in the same process (`serve all`, `postmesh dev`), reaching them on this process's port."""

from __future__ import annotations

import asyncio
import logging
import signal

from prometheus_client import start_http_server

import services.gateway.settings  # noqa: F401 - registers the gateway's settings
from postmesh.common.clients import MeshClients
from postmesh.common.config import SERVICE_NAMES, Settings
from postmesh.common.server import MeshServer
from postmesh.common.tls import mesh_client_tls
from postmesh.common.workers import WorkerRole
from services.gateway.server import Gateway

log = logging.getLogger(__name__)

NAME = "gateway"


def _local_address(listen: str) -> str:
    host, _, port = listen.rpartition(":")
    if host in ("", "0.0.0.0", "[::]", "::"):
        host = "127.0.0.1"
    return f"{host}:{port}"


def build_gateway(
    settings: Settings, service_key: str, *, reuse_port: bool = False
) -> tuple[Gateway, MeshClients]:
    if not service_key:
        raise ValueError("SERVICE_API_KEY must be set for the HTTP gateway to call the services")
    local = _local_address(settings.grpc_listen)
    endpoints = {name: settings.get(f"{name.upper()}_ENDPOINT") or local for name in SERVICE_NAMES}
    clients = MeshClients(
        endpoints,
        service_key,
        **mesh_client_tls(
            settings.grpc_tls_ca_file,
            settings.grpc_tls_server_name,
            settings.grpc_tls_cert_file,
            settings.grpc_tls_key_file,
        ),
    )
    gateway = Gateway(
        listen=settings.get("HTTP_API_LISTEN"),
        clients=clients,
        max_skew_seconds=settings.get("HTTP_API_MAX_CLOCK_SKEW_SECONDS"),
        max_body_bytes=settings.get("HTTP_API_MAX_BODY_BYTES"),
        reuse_port=reuse_port,
    )
    return gateway, clients


async def _until_signalled() -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()


async def serve(settings: Settings, mesh_names: list[str], *, worker: WorkerRole | None = None) -> None:
    """Runs the gateway, and the services named (if any), until SIGTERM or SIGINT."""
    worker = worker or WorkerRole()
    mesh = MeshServer(settings, mesh_names, worker=worker) if mesh_names else None
    gateway, clients = build_gateway(
        settings, mesh.service_key if mesh else settings.service_api_key, reuse_port=worker.shares_ports
    )
    try:
        await gateway.start()
    except OSError as exc:  # the port is taken, or the address is not ours: say which setting
        await clients.close()
        raise ValueError(f"HTTP_API_LISTEN={settings.get('HTTP_API_LISTEN')}: {exc.strerror or exc}") from exc
    print(f"SES-compatible HTTP API on {gateway.url} (HTTP_API_LISTEN)", flush=True)
    if mesh is None and settings.metrics_port:  # with services, their server exports the metrics
        host = settings.get("HTTP_API_LISTEN").rpartition(":")[0].strip("[]")
        start_http_server(settings.metrics_port, addr=host or "")
    try:
        if mesh is not None:
            await mesh.serve_until_signalled()
        else:
            await _until_signalled()
    finally:
        await gateway.stop()
        await clients.close()
