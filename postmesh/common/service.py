"""What a postmesh service is to the shared server bootstrap.

A service subclasses Service: it names its gRPC service, declares each RPC's Access, owns its tables
and migrations, registers a thin servicer, and may start background tasks once its database and NATS
are ready. Its dependencies arrive through the Runtime, never through module globals.
"""

from __future__ import annotations

import abc
import asyncio
import datetime as dt
import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Protocol

from grpc import aio
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext
from sqlalchemy import MetaData
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from postmesh.common.auth import Access, Authenticator
from postmesh.common.bus import EventPublisher
from postmesh.common.clients import MeshClients
from postmesh.common.config import Settings
from postmesh.common.errors import Unavailable
from postmesh.common.workers import WorkerRole

log = logging.getLogger(__name__)


class Clock(Protocol):
    def now(self) -> dt.datetime: ...


class SystemClock:
    def now(self) -> dt.datetime:
        return dt.datetime.now(dt.UTC)


@dataclass
class Runtime:
    """Everything a service needs, filled in by the bootstrap. `engine`, `nats` and friends are set
    before `ready` is; handlers only run once it is (the interceptor answers UNAVAILABLE before)."""

    name: str
    settings: Settings
    clients: MeshClients
    authenticator: Authenticator
    clock: Clock = field(default_factory=SystemClock)
    # Which of `serve all`'s worker processes this is (postmesh.common.workers).
    worker: WorkerRole = field(default_factory=WorkerRole)
    engine: AsyncEngine | None = None
    _sessions: async_sessionmaker[AsyncSession] | None = None
    nats: NATS | None = None
    js: JetStreamContext | None = None
    _events: EventPublisher | None = None
    ready: asyncio.Event = field(default_factory=asyncio.Event)
    tasks: list[asyncio.Task[None]] = field(default_factory=list)
    # Set by the bootstrap: reports a component of a service (e.g. a content scanner) as SERVING or
    # NOT_SERVING under its own name in the standard health service, apart from the service itself.
    report_health: Callable[[str, bool], Awaitable[None]] | None = None

    @property
    def sessions(self) -> async_sessionmaker[AsyncSession]:
        if self._sessions is None:
            raise Unavailable(f"The {self.name} service's database is not ready yet.")
        return self._sessions

    @property
    def events(self) -> EventPublisher:
        if self._events is None:
            raise Unavailable(f"The {self.name} service is not connected to NATS yet.")
        return self._events

    @property
    def jetstream(self) -> JetStreamContext:
        if self.js is None:
            raise Unavailable(f"The {self.name} service is not connected to NATS yet.")
        return self.js

    def spawn(self, coro_factory: Callable[[], Awaitable[None]], name: str) -> None:
        """Runs a background loop for the life of the service, restarting it (with a pause) if it fails."""

        async def supervise() -> None:
            while True:
                try:
                    await coro_factory()
                    return
                except asyncio.CancelledError:
                    raise
                except Exception:
                    log.exception("background task failed; restarting", extra={"task": name})
                    await asyncio.sleep(1.0)

        self.tasks.append(asyncio.create_task(supervise(), name=f"{self.name}:{name}"))

    def spawn_once(self, coro_factory: Callable[[], Awaitable[None]], name: str) -> None:
        """spawn() for background work that must not run in every worker process of one `serve all`
        (housekeeping, pollers, counters): it runs in worker 0 only. A process started on its own
        (a Kubernetes replica) is worker 0 of 1 and runs it, as before."""
        if self.worker.primary:
            self.spawn(coro_factory, name)


class Service(abc.ABC):
    name: ClassVar[str]
    # Full protobuf name of the gRPC service, e.g. "postmesh.identity.v1.IdentityService".
    full_name: ClassVar[str]
    # RPC method name -> who may call it. Methods not listed need an account's API key.
    access: ClassVar[Mapping[str, Access]] = {}
    metadata: ClassVar[MetaData | None] = None
    migrations_dir: ClassVar[Path | None] = None

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime

    @abc.abstractmethod
    def register(self, server: aio.Server) -> None:
        """Adds this service's servicer to the gRPC server."""

    async def on_ready(self) -> None:  # noqa: B027 - optional hook
        """Starts background work once the database and NATS are ready."""

    async def on_stop(self) -> None:  # noqa: B027 - optional hook
        """Releases what on_ready acquired."""

    def access_for(self, method: str) -> Access:
        return self.access.get(method, Access.ACCOUNT)
