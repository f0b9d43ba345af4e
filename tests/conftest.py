"""Fixtures with real parts: a nats-server with JetStream, SQLite and PostgreSQL, the mesh on loopback."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import nats as nats_client
import pytest
import uvloop
from nats.aio.client import Client as NATS

from postmesh.client import Client
from postmesh.common.bus import ensure_streams
from postmesh.common.natsserver import NatsServerProcess, free_port
from postmesh.testing import LOOPBACK_PROCESS_ENV, MeshThread

POSTGRES_ADMIN_URL = os.environ.get(
    "POSTMESH_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres"
)


# Code that handles transports itself (swaps protocols, writes and aborts) runs its async tests on
# both loops: uvloop, the default (EVENT_LOOP=auto), has transports that are none of asyncio's classes.
_ON_BOTH_LOOPS = {"test_delivery_pipelining.py", "test_smtp_units.py"}


def pytest_asyncio_loop_factories(config: pytest.Config, item: pytest.Item) -> Mapping[str, Any]:
    if item.path.name in _ON_BOTH_LOOPS:
        return {"asyncio": asyncio.new_event_loop, "uvloop": uvloop.new_event_loop}
    return {"asyncio": asyncio.new_event_loop}


@pytest.fixture(scope="session")
def nats_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NatsServerProcess]:
    """A nats-server of the suite's own (never the machine's), so tests run where none is installed."""
    server = NatsServerProcess(tmp_path_factory.mktemp("nats")).start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def nats_url(nats_server: NatsServerProcess) -> str:
    return nats_server.url


@pytest.fixture
async def nats(nats_url: str) -> AsyncIterator[NATS]:
    """A connection to the suite's nats-server, postmesh's streams declared."""
    connection = await nats_client.connect(nats_url)
    await ensure_streams(connection.jetstream())
    yield connection
    await connection.close()


def _postgres_reachable() -> bool:
    try:
        import psycopg2
    except ImportError:
        return False
    try:
        psycopg2.connect(POSTGRES_ADMIN_URL, connect_timeout=2).close()
        return True
    except Exception:
        return False


@pytest.fixture(scope="session")
def postgres_available() -> bool:
    return _postgres_reachable()


@pytest.fixture
def postgres_database(postgres_available: bool) -> Iterator[str]:
    """A fresh, empty PostgreSQL database (asyncpg URL), dropped afterwards; skipped without a server."""
    if not postgres_available:
        pytest.skip("no PostgreSQL reachable at " + POSTGRES_ADMIN_URL)
    import psycopg2

    name = f"postmesh_test_{uuid.uuid4().hex[:12]}"
    admin = psycopg2.connect(POSTGRES_ADMIN_URL)
    admin.autocommit = True
    admin.cursor().execute(f'CREATE DATABASE "{name}"')
    base = POSTGRES_ADMIN_URL.rsplit("/", 1)[0].replace("postgresql://", "postgresql+asyncpg://", 1)
    try:
        yield f"{base}/{name}"
    finally:
        admin.cursor().execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.close()


@pytest.fixture(params=["sqlite", "postgres"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """Each database test runs on SQLite always, and on PostgreSQL where one is reachable."""
    if request.param == "sqlite":
        return f"sqlite+aiosqlite:///{tmp_path / 'test.db'}"
    url: str = request.getfixturevalue("postgres_database")
    return url


MeshFactory = Callable[..., MeshThread]


@pytest.fixture
def start_mesh(nats_url: str, tmp_path: Path) -> Iterator[MeshFactory]:
    """Starts meshes (all services, or some) on loopback; every one is stopped after the test."""
    started: list[MeshThread] = []

    def factory(services: tuple[str, ...] = ("all",), **settings: Any) -> MeshThread:
        wait_ready = settings.pop("wait_ready", True)
        data_dir = settings.pop("data_dir", tmp_path / f"mesh{len(started)}")
        mesh = MeshThread(
            nats_url=settings.pop("nats_url", nats_url), data_dir=data_dir, services=services, **settings
        )
        started.append(mesh)
        return mesh.start(wait_ready=wait_ready)

    yield factory
    for mesh in reversed(started):
        mesh.stop()


@pytest.fixture
def mesh(start_mesh: MeshFactory) -> MeshThread:
    """The whole mesh in one process, on embedded SQLite and the suite's nats-server."""
    return start_mesh()


def _wait_serving(
    address: str, process: subprocess.Popen[bytes], output: Path, timeout: float = 90.0
) -> None:
    """Waits for the process's health to say SERVING; fails at once, with what it printed, if it exits."""
    with Client(address) as client:
        if client.wait_serving(timeout, exited=lambda: process.poll() is not None):
            return
    exited = process.poll() is not None
    if not exited:
        process.kill()
        process.wait(30)
    printed = output.read_text(errors="replace")
    state = f"exited with {process.returncode}" if exited else "did not become SERVING"
    pytest.fail(f"postmesh serve {state}; it printed:\n{printed[-6000:]}")


@pytest.fixture
def serve_process(nats_url: str, tmp_path: Path, request: pytest.FixtureRequest):  # type: ignore[no-untyped-def]
    """A real `postmesh serve all` process; parametrize indirectly with a dict to change its settings."""
    port, metrics_port = free_port(), free_port()
    env = {
        **os.environ,
        **LOOPBACK_PROCESS_ENV,
        "GRPC_LISTEN": f"127.0.0.1:{port}",
        "METRICS_PORT": str(metrics_port),
        "DATA_DIR": str(tmp_path / "var"),
        "NATS_URL": nats_url,
        "ADMIN_API_KEY": "admin-secret",
        "SHUTDOWN_GRACE_SECONDS": "30",
        "LOG_LEVEL": "WARNING",
        # Identity needs a DKIM master key; its link server and DNS checker stay on loopback.
        "DKIM_MASTER_KEYS": "test:" + "A" * 43,
        "IDENTITY_HTTP_LISTEN": "127.0.0.1:0",
        "HTTP_API_LISTEN": "127.0.0.1:0",
        "TRACKING_HTTP_LISTEN": "127.0.0.1:0",
        "SNS_HTTPS_LISTEN": "127.0.0.1:0",
        "INBOUND_SMTP_LISTEN": "127.0.0.1:0",
        "DNS_RESOLVER": "127.0.0.1:9",
        # Delivery workers would hold the outbound work queue's consumer after the process is gone.
        "DELIVERY_WORKERS": "0",
        # One process, whose metrics, traces and shutdown these tests read (tests/test_serve_workers.py
        # runs several).
        "SERVE_PROCESSES": "1",
        **getattr(request, "param", {}),
    }
    # Its output goes to a file: a pipe nobody reads would stall the process once full.
    output = tmp_path / "serve.log"
    with output.open("wb") as sink:
        process = subprocess.Popen(
            [sys.executable, "-m", "postmesh.cli.main", "serve", "all"],
            env=env,
            stdout=sink,
            stderr=subprocess.STDOUT,
        )
    try:
        _wait_serving(f"127.0.0.1:{port}", process, output)
        yield process, f"127.0.0.1:{port}", metrics_port, tmp_path / "var"
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
