"""The sender service as the server bootstrap sees it."""

from __future__ import annotations

import asyncio
import datetime as dt
from pathlib import Path

from grpc import aio

import services.sender.settings  # noqa: F401 - registers the accept path's settings
from postmesh.common.auth import Access
from postmesh.common.service import Service
from postmesh.sender.v1 import sender_pb2, sender_pb2_grpc
from services.sender import delivery_settings  # noqa: F401  (registers the delivery settings)
from services.sender.accept import Acceptor
from services.sender.delivery_wiring import Delivery
from services.sender.filtration.held import HeldStore, StoredPolicies
from services.sender.filtration.policy import DefaultPolicy
from services.sender.idempotency import IdempotencyKeys
from services.sender.mesh import MeshChecks
from services.sender.models import Base
from services.sender.servicer import SenderServicer
from services.sender.simulator import MailboxSimulator
from services.sender.templates import TemplateStore


class SenderService(Service):
    name = "sender"
    full_name = sender_pb2.DESCRIPTOR.services_by_name["SenderService"].full_name
    access = {
        "ListHeldMessages": Access.ADMIN,
        "GetHeldMessage": Access.ADMIN,
        "ReleaseHeldMessage": Access.ADMIN,
        "DropHeldMessage": Access.ADMIN,
        "PutAccountSpamPolicy": Access.ADMIN,
        "GetAccountSpamPolicy": Access.ADMIN,
    }
    metadata = Base.metadata
    migrations_dir = Path(__file__).parent / "migrations"

    def register(self, server: aio.Server) -> None:
        self.servicer = SenderServicer()
        sender_pb2_grpc.add_SenderServiceServicer_to_server(self.servicer, server)

    delivery: Delivery | None = None
    checks: MeshChecks | None = None

    async def on_ready(self) -> None:
        runtime = self.runtime
        self.servicer.templates = TemplateStore(runtime.sessions, runtime.clock)
        keys = IdempotencyKeys(
            runtime.sessions,
            runtime.clock,
            lease=dt.timedelta(seconds=runtime.settings.send_request_claim_seconds),
        )
        self.checks = MeshChecks(runtime.clients)
        assert runtime.nats is not None
        await self.checks.watch(runtime.nats)
        self.servicer.acceptor = Acceptor(
            js=runtime.jetstream,
            events=runtime.events,
            checks=self.checks,
            templates=self.servicer.templates,
            keys=keys,
            clock=runtime.clock,
            message_id_domain=runtime.settings.message_id_domain,
            simulator=MailboxSimulator(runtime.settings.simulator_domain),
            max_in_flight=runtime.settings.send_max_in_flight,
        )
        runtime.spawn_once(lambda: _purge_keys(keys), "purge-request-ids")
        self.servicer.held = HeldStore(
            sessions=runtime.sessions, js=runtime.jetstream, events=runtime.events, clock=runtime.clock
        )
        self.servicer.policies = StoredPolicies(
            runtime.sessions, DefaultPolicy.from_settings(runtime.settings), runtime.clock
        )
        # DELIVERY_WORKERS=0: an accept-only replica (delivery runs elsewhere).
        if runtime.settings.delivery_workers > 0:
            self.delivery = Delivery(runtime, held=self.servicer.held, policies=self.servicer.policies)
            await self.delivery.start()

    async def on_stop(self) -> None:
        if self.delivery is not None:
            await self.delivery.stop()
        if self.checks is not None:
            # In one process the quota service may already be gone: its leases then simply lapse.
            await asyncio.wait_for(self.checks.close(), timeout=5)
        acceptor = getattr(self.servicer, "acceptor", None)
        if acceptor is not None:
            acceptor.close()


async def _purge_keys(keys: IdempotencyKeys) -> None:
    while True:
        await keys.purge()
        await asyncio.sleep(3600)


SERVICE = SenderService
