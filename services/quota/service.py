"""The quota service as the server bootstrap sees it."""

from __future__ import annotations

from pathlib import Path

from grpc import aio

import services.quota.settings  # noqa: F401 - registers the service's settings
from postmesh.common.auth import Access
from postmesh.common.service import Service
from postmesh.quota.v1 import quota_pb2, quota_pb2_grpc
from services.quota.access import ProductionAccess
from services.quota.accounts import QuotaAccounts
from services.quota.housekeeping import Housekeeping
from services.quota.increases import QuotaIncreases
from services.quota.models import Base
from services.quota.notify import Notifier
from services.quota.servicer import QuotaServicer
from services.quota.statistics import EventConsumer, ReputationJudge, SendStatistics


class QuotaService(Service):
    name = "quota"
    full_name = quota_pb2.DESCRIPTOR.services_by_name["QuotaService"].full_name
    access = {
        "ReserveSendQuota": Access.INTERNAL,
        "ReleaseSendQuota": Access.INTERNAL,
        "ListAccountSendingStates": Access.ADMIN,
        "GetAccountSendingState": Access.ADMIN,
        "ListProductionAccessRequests": Access.ADMIN,
        "GrantProductionAccess": Access.ADMIN,
        "DenyProductionAccess": Access.ADMIN,
        "PauseAccountSending": Access.ADMIN,
        "ReinstateAccountSending": Access.ADMIN,
        "SetAccountQuota": Access.ADMIN,
    }
    metadata = Base.metadata
    migrations_dir = Path(__file__).parent / "migrations"

    def register(self, server: aio.Server) -> None:
        self.servicer = QuotaServicer()
        quota_pb2_grpc.add_QuotaServiceServicer_to_server(self.servicer, server)

    async def on_ready(self) -> None:
        runtime = self.runtime
        sessions, clock, settings = runtime.sessions, runtime.clock, runtime.settings
        notifier = Notifier(runtime.events, runtime.jetstream, settings, clock)
        accounts = QuotaAccounts(sessions, clock, settings, notifier)
        statistics = SendStatistics(sessions, clock, settings, accounts)
        self.servicer.accounts = accounts
        self.servicer.access = ProductionAccess(sessions, clock, settings, accounts, notifier)
        self.servicer.statistics = statistics
        self.increases = QuotaIncreases(sessions, clock, settings, accounts, statistics)
        consumer = EventConsumer(runtime.jetstream, statistics)
        runtime.spawn_once(consumer.run, "statistics")
        judge = ReputationJudge(statistics, settings.reputation_evaluation_seconds)
        runtime.spawn_once(judge.run, "reputation")
        runtime.spawn_once(self.increases.run, "quota-increases")
        self.housekeeping = Housekeeping(sessions, clock, settings, accounts)
        runtime.spawn_once(self.housekeeping.run, "housekeeping")


SERVICE = QuotaService
