"""The feedback service as the server bootstrap sees it."""

from __future__ import annotations

from pathlib import Path

from grpc import aio

from postmesh.common.auth import Access
from postmesh.common.service import Service
from postmesh.feedback.v1 import feedback_pb2, feedback_pb2_grpc
from services.feedback.models import Base
from services.feedback.servicer import FeedbackServicer
from services.feedback.suppression import SuppressionList


class FeedbackService(Service):
    name = "feedback"
    full_name = feedback_pb2.DESCRIPTOR.services_by_name["FeedbackService"].full_name
    access = {"CheckSuppressedDestinations": Access.INTERNAL}
    metadata = Base.metadata
    migrations_dir = Path(__file__).parent / "migrations"

    def register(self, server: aio.Server) -> None:
        self.servicer = FeedbackServicer()
        feedback_pb2_grpc.add_FeedbackServiceServicer_to_server(self.servicer, server)

    async def on_ready(self) -> None:
        self.servicer.suppression = SuppressionList(self.runtime.sessions, self.runtime.clock)


SERVICE = FeedbackService
