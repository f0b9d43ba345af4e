"""gRPC surface of the quota service."""

from __future__ import annotations

from grpc import aio

from postmesh.common.auth import caller_account_id
from postmesh.common.protoutil import timestamp
from postmesh.quota.v1 import quota_pb2 as pb
from postmesh.quota.v1 import quota_pb2_grpc
from services.quota.accounts import QuotaAccounts


class QuotaServicer(quota_pb2_grpc.QuotaServiceServicer):
    # Bound in QuotaService.on_ready.
    accounts: QuotaAccounts

    async def GetAccount(
        self, request: pb.GetAccountRequest, context: aio.ServicerContext
    ) -> pb.GetAccountResponse:
        state = await self.accounts.state(caller_account_id())
        quota = state.quota
        return pb.GetAccountResponse(
            production_access_enabled=quota.production_access,
            sending_enabled=quota.sending_enabled,
            enforcement_status=pb.EnforcementStatus.Value(f"ENFORCEMENT_STATUS_{quota.enforcement_status}"),
            send_quota=pb.SendQuota(
                max_24_hour_send=quota.max_24_hour_send,
                max_send_rate=quota.max_send_rate,
                sent_last_24_hours=state.sent_last_24_hours,
            ),
            create_time=timestamp(quota.created_at),
        )
