"""The sender service as the server bootstrap sees it."""

from __future__ import annotations

from pathlib import Path

from grpc import aio

from postmesh.common.service import Service
from postmesh.sender.v1 import sender_pb2, sender_pb2_grpc
from services.sender import delivery_settings  # noqa: F401  (registers the delivery settings)
from services.sender.delivery_wiring import Delivery
from services.sender.models import Base
from services.sender.servicer import SenderServicer
from services.sender.templates import TemplateStore


class SenderService(Service):
    name = "sender"
    full_name = sender_pb2.DESCRIPTOR.services_by_name["SenderService"].full_name
    metadata = Base.metadata
    migrations_dir = Path(__file__).parent / "migrations"

    def register(self, server: aio.Server) -> None:
        self.servicer = SenderServicer()
        sender_pb2_grpc.add_SenderServiceServicer_to_server(self.servicer, server)

    delivery: Delivery | None = None

    async def on_ready(self) -> None:
        self.servicer.templates = TemplateStore(self.runtime.sessions, self.runtime.clock)
        # DELIVERY_WORKERS=0: an accept-only replica (delivery runs elsewhere).
        if self.runtime.settings.delivery_workers > 0:
            self.delivery = Delivery(self.runtime)
            await self.delivery.start()

    async def on_stop(self) -> None:
        if self.delivery is not None:
            await self.delivery.stop()


SERVICE = SenderService
