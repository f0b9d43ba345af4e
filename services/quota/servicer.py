"""gRPC surface of the quota service: decode, call the domain, encode."""

from __future__ import annotations

from grpc import aio

from postmesh.common.auth import account_for_internal_call, caller_account_id
from postmesh.common.protoutil import timestamp
from postmesh.quota.v1 import quota_pb2 as pb
from postmesh.quota.v1 import quota_pb2_grpc
from services.quota.accounts import (
    HEALTHY,
    OPERATOR,
    SHUTDOWN,
    AccountState,
    QuotaAccounts,
    require_account_id,
)
from services.quota.models import AccountChangeRecord


def send_quota(state: AccountState) -> pb.SendQuota:
    return pb.SendQuota(
        max_24_hour_send=state.quota.max_24_hour_send,
        max_send_rate=state.quota.max_send_rate,
        sent_last_24_hours=state.sent_last_24_hours,
    )


def enforcement_status(name: str) -> pb.EnforcementStatus.ValueType:
    return pb.EnforcementStatus.Value(f"ENFORCEMENT_STATUS_{name}")


def sending_state(state: AccountState) -> pb.AccountSendingState:
    quota = state.quota
    return pb.AccountSendingState(
        account_id=quota.account_id,
        production_access_enabled=quota.production_access,
        sending_enabled=quota.sending_enabled,
        enforcement_status=enforcement_status(quota.enforcement_status),
        send_quota=send_quota(state),
        enforcement_reason=quota.enforcement_reason,
        create_time=timestamp(quota.created_at),
    )


def change_message(change: AccountChangeRecord) -> pb.AccountChange:
    return pb.AccountChange(
        time=timestamp(change.at),
        kind=change.kind,
        reason=change.reason,
        actor=change.actor,
        production_access_enabled=change.production_access,
        sending_enabled=change.sending_enabled,
        enforcement_status=enforcement_status(change.enforcement_status),
        max_24_hour_send=change.max_24_hour_send,
        max_send_rate=change.max_send_rate,
    )


class QuotaServicer(quota_pb2_grpc.QuotaServiceServicer):
    # Bound in QuotaService.on_ready; the interceptor lets no call through before that.
    accounts: QuotaAccounts

    async def GetAccount(
        self, request: pb.GetAccountRequest, context: aio.ServicerContext
    ) -> pb.GetAccountResponse:
        state = await self.accounts.state(caller_account_id())
        quota = state.quota
        return pb.GetAccountResponse(
            production_access_enabled=quota.production_access,
            sending_enabled=quota.sending_enabled,
            enforcement_status=enforcement_status(quota.enforcement_status),
            send_quota=send_quota(state),
            create_time=timestamp(quota.created_at),
            enforcement_reason=quota.enforcement_reason,
        )

    async def ReserveSendQuota(
        self, request: pb.ReserveSendQuotaRequest, context: aio.ServicerContext
    ) -> pb.ReserveSendQuotaResponse:
        grant = await self.accounts.reserve(
            account_for_internal_call(request.account_id), request.messages, request.lease_messages
        )
        return pb.ReserveSendQuotaResponse(
            reservation_id=grant.reservation_id,
            production_access_enabled=grant.production_access,
            granted_messages=grant.granted,
            lease_seconds=grant.lease_seconds,
        )

    async def ReleaseSendQuota(
        self, request: pb.ReleaseSendQuotaRequest, context: aio.ServicerContext
    ) -> pb.ReleaseSendQuotaResponse:
        await self.accounts.release(
            account_for_internal_call(request.account_id), request.reservation_id, request.messages
        )
        return pb.ReleaseSendQuotaResponse()

    # --- Operator RPCs.

    async def ListAccountSendingStates(
        self, request: pb.ListAccountSendingStatesRequest, context: aio.ServicerContext
    ) -> pb.ListAccountSendingStatesResponse:
        states, token = await self.accounts.list_states(request.page_size, request.page_token)
        return pb.ListAccountSendingStatesResponse(
            accounts=[sending_state(s) for s in states], next_page_token=token
        )

    async def GetAccountSendingState(
        self, request: pb.GetAccountSendingStateRequest, context: aio.ServicerContext
    ) -> pb.GetAccountSendingStateResponse:
        account_id = require_account_id(request.account_id)
        state = await self.accounts.state(account_id)
        changes, _ = await self.accounts.changes(account_id, 50, "")
        return pb.GetAccountSendingStateResponse(
            account=sending_state(state), changes=[change_message(c) for c in changes]
        )

    async def PauseAccountSending(
        self, request: pb.PauseAccountSendingRequest, context: aio.ServicerContext
    ) -> pb.PauseAccountSendingResponse:
        state = await self.accounts.set_enforcement(
            request.account_id, SHUTDOWN, request.reason or "Paused by an operator.", OPERATOR
        )
        return pb.PauseAccountSendingResponse(account=sending_state(state))

    async def ReinstateAccountSending(
        self, request: pb.ReinstateAccountSendingRequest, context: aio.ServicerContext
    ) -> pb.ReinstateAccountSendingResponse:
        state = await self.accounts.set_enforcement(
            request.account_id,
            HEALTHY,
            request.reason or "Reinstated by an operator.",
            OPERATOR,
            reset_reputation=True,
        )
        return pb.ReinstateAccountSendingResponse(account=sending_state(state))

    async def SetAccountQuota(
        self, request: pb.SetAccountQuotaRequest, context: aio.ServicerContext
    ) -> pb.SetAccountQuotaResponse:
        state = await self.accounts.set_quota(
            request.account_id,
            request.max_24_hour_send,
            request.max_send_rate,
            request.reason or "Set by an operator.",
            OPERATOR,
        )
        return pb.SetAccountQuotaResponse(account=sending_state(state))

    async def ListAccountChanges(
        self, request: pb.ListAccountChangesRequest, context: aio.ServicerContext
    ) -> pb.ListAccountChangesResponse:
        changes, token = await self.accounts.changes(
            caller_account_id(), request.page_size, request.page_token
        )
        return pb.ListAccountChangesResponse(
            changes=[change_message(c) for c in changes], next_page_token=token
        )
