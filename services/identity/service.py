"""The identity service as the server bootstrap sees it."""

from __future__ import annotations

from pathlib import Path

from grpc import aio

from postmesh.common.auth import Access
from postmesh.common.service import Service
from postmesh.identity.v1 import identity_pb2, identity_pb2_grpc
from services.identity.accounts import AccountStore
from services.identity.models import Base
from services.identity.servicer import IdentityServicer


class IdentityService(Service):
    name = "identity"
    full_name = identity_pb2.DESCRIPTOR.services_by_name["IdentityService"].full_name
    access = {
        "CreateAccount": Access.ADMIN,
        "ListAccounts": Access.ADMIN,
        "AuthenticateApiKey": Access.INTERNAL,
        "AuthorizeSender": Access.INTERNAL,
        "CheckVerifiedRecipients": Access.INTERNAL,
        "GetSigningConfig": Access.INTERNAL,
    }
    metadata = Base.metadata
    migrations_dir = Path(__file__).parent / "migrations"

    def register(self, server: aio.Server) -> None:
        self.servicer = IdentityServicer()
        identity_pb2_grpc.add_IdentityServiceServicer_to_server(self.servicer, server)

    async def on_ready(self) -> None:
        runtime = self.runtime
        self.servicer.accounts = AccountStore(runtime.sessions, runtime.clock, runtime.events)


SERVICE = IdentityService
