"""Fixtures with real parts: a nats-server with JetStream, SQLite and PostgreSQL, the mesh on loopback."""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from postmesh.common.natsserver import NatsServerProcess
from postmesh.testing import MeshThread

POSTGRES_ADMIN_URL = os.environ.get(
    "POSTMESH_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres"
)


@pytest.fixture(scope="session")
def nats_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NatsServerProcess]:
    """A nats-server of the suite's own (never the machine's), so tests run where none is installed."""
    server = NatsServerProcess(tmp_path_factory.mktemp("nats")).start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def nats_url(nats_server: NatsServerProcess) -> str:
    return nats_server.url


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
