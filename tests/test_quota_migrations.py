"""The quota service's hand-written migrations create exactly what its models describe."""

from __future__ import annotations

import asyncio
from typing import Any

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import Connection

from postmesh.common import db
from services.quota.models import Base
from services.quota.service import QuotaService


def test_migrations_match_the_models(database_url: str) -> None:
    async def main() -> list[Any]:
        engine = db.create_engine(database_url)
        assert QuotaService.migrations_dir is not None
        await db.migrate(engine, QuotaService.migrations_dir, "alembic_version_quota", Base.metadata)

        def compare(connection: Connection) -> list[Any]:
            context = MigrationContext.configure(
                connection, opts={"compare_type": True, "version_table": "alembic_version_quota"}
            )
            return list(compare_metadata(context, Base.metadata))

        async with engine.connect() as connection:
            differences = await connection.run_sync(compare)
        await engine.dispose()
        return differences

    assert asyncio.run(main()) == []
