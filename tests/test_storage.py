"""Each service's migrations apply from empty, twice without harm, and match its models exactly."""

from __future__ import annotations

import asyncio

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import inspect
from sqlalchemy.engine import Connection

from postmesh.common import db
from postmesh.common.config import SERVICE_NAMES
from postmesh.common.server import service_class


def _drift(connection: Connection, version_table: str, metadata: object) -> list[object]:
    context = MigrationContext.configure(
        connection, opts={"version_table": version_table, "compare_type": True}
    )
    diffs = compare_metadata(context, metadata)  # type: ignore[arg-type]
    own_tables = set(metadata.tables)  # type: ignore[attr-defined]
    # The services share one database here, as they may in production: only this service's tables matter.
    return [d for d in diffs if _table_of(d) in own_tables]


def _table_of(diff: object) -> str:
    item = diff[0] if isinstance(diff, list) else diff  # column changes come as lists of tuples
    assert isinstance(item, tuple)
    for part in item[1:]:
        table = getattr(part, "table", None)
        if table is not None:
            return str(table.name)
        name = getattr(part, "name", None)
        if isinstance(part, str) or name is None:
            continue
        if hasattr(part, "columns") and hasattr(part, "schema"):
            return str(name)
    # ("modify_type", schema, table, column, ...): the table name is the third item.
    return str(item[2]) if len(item) > 2 and isinstance(item[2], str) else ""


async def _migrate_all_and_compare(url: str) -> dict[str, list[object]]:
    engine = db.create_engine(url)
    drift: dict[str, list[object]] = {}
    try:
        for name in SERVICE_NAMES:
            service = service_class(name)
            assert service.metadata is not None and service.migrations_dir is not None
            version_table = f"alembic_version_{name}"
            for _ in range(2):  # a second run at head changes nothing
                await db.migrate(engine, service.migrations_dir, version_table, service.metadata)
            async with engine.connect() as connection:
                drift[name] = await connection.run_sync(_drift, version_table, service.metadata)
                tables = await connection.run_sync(lambda c: set(inspect(c).get_table_names()))
            assert set(service.metadata.tables) <= tables
            assert version_table in tables
    finally:
        await engine.dispose()
    return drift


def test_migrations_apply_from_empty_and_match_models(database_url: str) -> None:
    drift = asyncio.run(_migrate_all_and_compare(database_url))
    assert drift == {name: [] for name in SERVICE_NAMES}


@pytest.mark.parametrize("service_name", SERVICE_NAMES)
def test_every_service_has_a_migration_chain(service_name: str) -> None:
    service = service_class(service_name)
    assert service.migrations_dir is not None
    versions = list((service.migrations_dir / "versions").glob("*.py"))
    assert versions, f"{service_name} has no migrations"
