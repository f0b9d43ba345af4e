"""Database sessions and migrations shared by every service.

Each service owns its tables (its own DeclarativeBase and Alembic versions folder) and its own
database URL. SQLite (aiosqlite) is the embedded default; PostgreSQL (asyncpg) is for production.
Migrations run at start-up, each service recording its revision in its own version table, so several
services may share one PostgreSQL database.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import os
import threading
import weakref
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from alembic.config import Config
from alembic.runtime.environment import EnvironmentContext
from alembic.script import ScriptDirectory
from sqlalchemy import DateTime, MetaData, Table, event
from sqlalchemy import exc as sa_exc
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection, make_url
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker, create_async_engine
from sqlalchemy.types import TypeDecorator

log = logging.getLogger(__name__)


class UTCDateTime(TypeDecorator[dt.datetime]):
    """A timezone-aware UTC datetime on every backend (SQLite drops the offset otherwise)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: dt.datetime | None, dialect: Any) -> dt.datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to a UTCDateTime column")
        return value.astimezone(dt.UTC)

    def process_result_value(self, value: dt.datetime | None, dialect: Any) -> dt.datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=dt.UTC) if value.tzinfo is None else value.astimezone(dt.UTC)


# Constraint names that Alembic can refer to, the same on every backend.
NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


def service_metadata() -> MetaData:
    return MetaData(naming_convention=NAMING_CONVENTION)


def create_engine(url: str) -> AsyncEngine:
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        if parsed.database and parsed.database != ":memory:":
            Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
        engine = create_async_engine(url, connect_args={"timeout": 30})

        @event.listens_for(engine.sync_engine, "connect")
        def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
            cursor = dbapi_connection.cursor()
            # WAL lets readers run beside the one writer; foreign keys are off by default in SQLite.
            cursor.execute("PRAGMA journal_mode=WAL")
            # In WAL mode NORMAL syncs at checkpoints, not at every commit: a commit survives a crash
            # of the process, and only a power loss may take the last few back.
            cursor.execute("PRAGMA synchronous=NORMAL")
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.execute("PRAGMA busy_timeout=30000")
            cursor.close()

        return engine
    # A connection attempt to an unreachable server fails in seconds, not asyncpg's default minute.
    return create_async_engine(
        url,
        pool_pre_ping=True,
        pool_size=10,
        max_overflow=20,
        connect_args={"timeout": 10},
    )


# SQLite errors that mean "not now" (the file cannot be opened, written or locked), not a bug.
_SQLITE_UNAVAILABLE = ("unable to open", "disk i/o", "locked", "readonly", "busy", "no such file")


def unreachable(exc: BaseException) -> bool:
    """True when `exc`, or what caused it, says the database cannot be reached or used right now."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, (OSError, sa_exc.TimeoutError, sa_exc.DisconnectionError)):
            return True
        if isinstance(current, sa_exc.DBAPIError) and current.connection_invalidated:
            return True
        if isinstance(current, sa_exc.InterfaceError):
            return True
        if isinstance(current, sa_exc.OperationalError):
            text = str(current.orig or current).lower()
            is_sqlite = type(current.orig).__module__.startswith("sqlite3")
            if not is_sqlite or any(s in text for s in _SQLITE_UNAVAILABLE):
                return True
        if type(current).__module__.startswith("asyncpg") and type(current).__name__ in _ASYNCPG_UNAVAILABLE:
            return True
        current = current.__cause__ or current.__context__
    return False


_ASYNCPG_UNAVAILABLE = {
    "ConnectionDoesNotExistError",
    "ConnectionFailureError",
    "CannotConnectNowError",
    "ConnectionRejectionError",
    "TooManyConnectionsError",
    "AdminShutdownError",
    "CrashShutdownError",
    "InterfaceError",
    "InternalClientError",
}


async def reachable(engine: AsyncEngine, seconds: float = 5.0) -> bool:
    """One `SELECT 1`: does the database answer now?"""
    try:
        async with asyncio.timeout(seconds), engine.connect() as connection:
            await connection.exec_driver_sql("SELECT 1")
    except Exception:
        return False
    return True


def session_factory(engine: AsyncEngine) -> async_sessionmaker[AsyncSession]:
    return async_sessionmaker(engine, expire_on_commit=False)


def _upgrade(connection: Connection, migrations_dir: Path, version_table: str, target: MetaData) -> None:
    config = Config()
    config.set_main_option("script_location", str(migrations_dir))
    script = ScriptDirectory.from_config(config)

    def upgrade(rev: Any, _context: Any) -> Any:
        return script._upgrade_revs("head", rev)

    with EnvironmentContext(config, script, fn=upgrade) as env:
        env.configure(
            connection=connection,
            target_metadata=target,
            version_table=version_table,
            render_as_batch=connection.dialect.name == "sqlite",
        )
        with env.begin_transaction():
            env.run_migrations()


# Alembic's `op` and `context` are process-wide proxies: two services migrating at once in one
# process would run each other's operations. One lock per event loop keeps a loop's services in turn
# (a thread lock alone would deadlock a loop against itself); the thread lock covers several loops.
_LOOP_LOCKS: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Lock] = weakref.WeakKeyDictionary()
_THREAD_LOCK = threading.Lock()


# Key of the PostgreSQL advisory lock every postmesh process takes to migrate (any service).
MIGRATION_LOCK_KEY = 0x706F73746D657368  # "postmesh"


def _take_migration_lock(connection: Connection) -> None:
    """Serializes migrations across processes: two starting at once on a fresh database would both
    create the version table. The lock is held until the migration's transaction ends."""
    if connection.dialect.name == "postgresql":
        connection.exec_driver_sql(f"SELECT pg_advisory_xact_lock({MIGRATION_LOCK_KEY})")
    elif connection.dialect.name == "sqlite":
        # The database's write lock, taken before anything is read (waits up to busy_timeout).
        connection.exec_driver_sql("BEGIN EXCLUSIVE")


def _upgrade_locked(
    connection: Connection, migrations_dir: Path, version_table: str, target: MetaData
) -> None:
    with _THREAD_LOCK:
        _take_migration_lock(connection)
        _upgrade(connection, migrations_dir, version_table, target)


async def migrate(engine: AsyncEngine, migrations_dir: Path, version_table: str, target: MetaData) -> None:
    """Applies the service's Alembic revisions up to head (idempotent)."""
    lock = _LOOP_LOCKS.setdefault(asyncio.get_running_loop(), asyncio.Lock())
    async with lock, engine.begin() as connection:
        await connection.run_sync(_upgrade_locked, migrations_dir, version_table, target)


async def connect_with_retry(
    engine: AsyncEngine, *, max_delay: float, stop: asyncio.Event | None = None
) -> None:
    """Waits until the database answers, backing off exponentially up to max_delay between tries."""
    delay = 0.2
    while True:
        try:
            async with engine.connect() as connection:
                await connection.exec_driver_sql("SELECT 1")
            return
        except Exception as exc:  # any driver error means "not yet"
            log.warning("database not reachable, retrying", extra={"error": str(exc), "retry_in": delay})
            if stop is not None and stop.is_set():
                raise
            await asyncio.sleep(delay)
            delay = min(delay * 2, max_delay)


def insert_ignoring_duplicates(
    sessions: async_sessionmaker[AsyncSession], table: Table, key: list[str]
) -> Any:
    """INSERT … ON CONFLICT (`key`) DO NOTHING on the sessions' database (PostgreSQL or SQLite).
    Build it once and run it with a list of rows: SQLAlchemy compiles it once and runs each batch as
    an executemany."""
    dialect = sessions.kw["bind"].dialect.name
    insert = postgresql.insert if dialect == "postgresql" else sqlite.insert
    return insert(table).on_conflict_do_nothing(index_elements=key)


@asynccontextmanager
async def transaction(factory: async_sessionmaker[AsyncSession]) -> AsyncIterator[AsyncSession]:
    """One session per request or message, committed on success and rolled back on error."""
    async with factory() as session, session.begin():
        yield session


def sqlite_path(url: str) -> str | None:
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite" and parsed.database:
        return os.path.abspath(parsed.database)
    return None
