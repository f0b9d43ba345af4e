"""`postmesh migrate`: two real processes migrating a fresh database at the same moment both succeed
(the migration lock: a PostgreSQL advisory lock, SQLite's write lock), every service ends at its
head revision, and a database that cannot be reached makes the command exit non-zero."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from alembic.config import Config
from alembic.script import ScriptDirectory
from sqlalchemy import text

from postmesh.common import db
from postmesh.common.config import SERVICE_NAMES
from postmesh.common.natsserver import free_port
from postmesh.common.server import service_class


def _migrate(database_url: str, tmp_path: Path, *services: str) -> subprocess.Popen[bytes]:
    env = {**os.environ, "DATABASE_URL": database_url, "DATA_DIR": str(tmp_path), "LOG_LEVEL": "WARNING"}
    return subprocess.Popen(
        [sys.executable, "-m", "postmesh.cli.main", "migrate", *services],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )


def _head(name: str) -> str:
    config = Config()
    config.set_main_option("script_location", str(service_class(name).migrations_dir))
    head = ScriptDirectory.from_config(config).get_current_head()
    assert head is not None
    return head


async def test_two_processes_migrate_a_fresh_database_at_once(database_url: str, tmp_path: Path) -> None:
    processes = [_migrate(database_url, tmp_path) for _ in range(2)]
    outputs = [p.communicate(timeout=180)[0].decode() for p in processes]
    assert [p.returncode for p in processes] == [0, 0], outputs
    for output in outputs:
        assert all(f"{name}: migrated to head" in output for name in SERVICE_NAMES), output
    engine = db.create_engine(database_url)
    try:
        async with engine.connect() as connection:
            for name in SERVICE_NAMES:
                query = text(f"SELECT version_num FROM alembic_version_{name}")
                rows = (await connection.execute(query)).all()
                assert [r[0] for r in rows] == [_head(name)]
    finally:
        await engine.dispose()
    # Again, on a migrated database: nothing to do, still success.
    again = _migrate(database_url, tmp_path, "sender")
    assert again.wait(timeout=120) == 0


@pytest.mark.parametrize("services", [["quota"], ["nonsense"]])
def test_migrate_fails_loudly(tmp_path: Path, services: list[str]) -> None:
    unreachable = f"postgresql+asyncpg://postgres@127.0.0.1:{free_port()}/postmesh"
    process = _migrate(unreachable, tmp_path, *services)
    output = process.communicate(timeout=120)[0].decode()
    assert process.returncode == (1 if services == ["quota"] else 2), output
    assert "error:" in output
