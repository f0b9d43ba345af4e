"""gRPC surface of the quota service: decode, call the domain, encode."""

from __future__ import annotations

from grpc import aio

from postmesh.common.auth import account_for_internal_call, caller_account_id
from postmesh.common.protoutil import timestamp
from postmesh.quota.v1 import quota_pb2 as pb
from postmesh.quota.v1 import quota_pb2_grpc
from services.quota.access import AccountDetailsInput, ProductionAccess
from services.quota.accounts import (
    HEALTHY,
    OPERATOR,
    SHUTDOWN,
    AccountState,
    QuotaAccounts,
    require_account_id,
)
from services.quota.models import AccountChangeRecord, AccountQuota, ProductionAccessCase
from services.quota.notify import contact_addresses
from services.quota.statistics import Reputation, SendStatistics


def send_quota(state: AccountState) -> pb.SendQuota:
    return pb.SendQuota(
        max_24_hour_send=state.quota.max_24_hour_send,
        max_send_rate=state.quota.max_send_rate,
        sent_last_24_hours=state.sent_last_24_hours,
    )


def enforcement_status(name: str) -> pb.EnforcementStatus.ValueType:
    return pb.EnforcementStatus.Value(f"ENFORCEMENT_STATUS_{name}")


def _enum_name(prefix: str, value: str) -> str:
    return f"{prefix}_{value}" if value else f"{prefix}_UNSPECIFIED"


def details_message(
    mail_type: str,
    website_url: str,
    contact_language: str,
    use_case_description: str,
    contacts: list[str],
    expected_daily_volume: int,
    review_status: str,
    case_id: str,
) -> pb.AccountDetails:
    return pb.AccountDetails(
        mail_type=pb.MailType.Value(_enum_name("MAIL_TYPE", mail_type)),
        website_url=website_url,
        contact_language=pb.ContactLanguage.Value(_enum_name("CONTACT_LANGUAGE", contact_language)),
        use_case_description=use_case_description,
        additional_contact_email_addresses=contacts,
        expected_daily_volume=expected_daily_volume,
        review_details=pb.ReviewDetails(
            status=pb.ReviewStatus.Value(_enum_name("REVIEW_STATUS", review_status)), case_id=case_id
        ),
    )


def account_details(row: AccountQuota, review_status: str) -> pb.AccountDetails:
    return details_message(
        row.mail_type,
        row.website_url,
        row.contact_language,
        row.use_case_description,
        contact_addresses(row),
        row.expected_daily_volume,
        review_status,
        row.review_case_id,
    )


def reputation_message(reputation: Reputation) -> pb.Reputation:
    return pb.Reputation(
        bounce_rate=reputation.bounce_rate,
        complaint_rate=reputation.complaint_rate,
        messages_in_window=reputation.sends,
        bounces_in_window=reputation.bounces,
        complaints_in_window=reputation.complaints,
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


def case_message(case: ProductionAccessCase) -> pb.ProductionAccessRequest:
    return pb.ProductionAccessRequest(
        case_id=case.case_id,
        account_id=case.account_id,
        status=pb.ReviewStatus.Value(_enum_name("REVIEW_STATUS", case.status)),
        details=details_message(
            case.mail_type,
            case.website_url,
            case.contact_language,
            case.use_case_description,
            [a for a in case.contact_addresses.split("\n") if a],
            case.expected_daily_volume,
            case.status,
            case.case_id,
        ),
        create_time=timestamp(case.created_at),
        decide_time=timestamp(case.decided_at),
        decision_note=case.decision_note,
    )


def _name_of(enum: type, prefix: str, value: int) -> str:
    """The stored name of a request enum ("" for UNSPECIFIED)."""
    name: str = enum.Name(value)  # type: ignore[attr-defined]
    return "" if name.endswith("_UNSPECIFIED") else name.removeprefix(prefix + "_")


class QuotaServicer(quota_pb2_grpc.QuotaServiceServicer):
    # Bound in QuotaService.on_ready; the interceptor lets no call through before that.
    accounts: QuotaAccounts
    access: ProductionAccess
    statistics: SendStatistics

    async def _sending_state(self, state: AccountState) -> pb.AccountSendingState:
        quota = state.quota
        return pb.AccountSendingState(
            account_id=quota.account_id,
            production_access_enabled=quota.production_access,
            sending_enabled=quota.sending_enabled,
            enforcement_status=enforcement_status(quota.enforcement_status),
            send_quota=send_quota(state),
            reputation=reputation_message(await self.statistics.reputation(quota)),
            enforcement_reason=quota.enforcement_reason,
            details=account_details(quota, await self.access.review_status(quota.review_case_id)),
            create_time=timestamp(quota.created_at),
        )

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
            details=account_details(quota, await self.access.review_status(quota.review_case_id)),
            reputation=reputation_message(await self.statistics.reputation(quota)),
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

    async def PutAccountDetails(
        self, request: pb.PutAccountDetailsRequest, context: aio.ServicerContext
    ) -> pb.PutAccountDetailsResponse:
        status, case_id = await self.access.put_details(
            caller_account_id(),
            AccountDetailsInput(
                mail_type=_name_of(pb.MailType, "MAIL_TYPE", request.mail_type),
                website_url=request.website_url,
                contact_language=_name_of(pb.ContactLanguage, "CONTACT_LANGUAGE", request.contact_language),
                use_case_description=request.use_case_description,
                contact_addresses=list(request.additional_contact_email_addresses),
                production_access_requested=request.production_access_enabled,
                expected_daily_volume=request.expected_daily_volume,
            ),
        )
        return pb.PutAccountDetailsResponse(
            review_details=pb.ReviewDetails(
                status=pb.ReviewStatus.Value(_enum_name("REVIEW_STATUS", status)), case_id=case_id
            )
        )

    async def GetSendStatistics(
        self, request: pb.GetSendStatisticsRequest, context: aio.ServicerContext
    ) -> pb.GetSendStatisticsResponse:
        slots = await self.statistics.data_points(caller_account_id())
        return pb.GetSendStatisticsResponse(
            send_data_points=[
                pb.SendDataPoint(
                    timestamp=timestamp(slot.slot_start),
                    delivery_attempts=slot.delivery_attempts,
                    bounces=slot.bounces,
                    complaints=slot.complaints,
                    rejects=slot.rejects,
                    held=slot.held,
                    held_released=slot.held_released,
                    held_dropped=slot.held_dropped,
                )
                for slot in slots
            ]
        )

    async def ListAccountChanges(
        self, request: pb.ListAccountChangesRequest, context: aio.ServicerContext
    ) -> pb.ListAccountChangesResponse:
        changes, token = await self.accounts.changes(
            caller_account_id(), request.page_size, request.page_token
        )
        return pb.ListAccountChangesResponse(
            changes=[change_message(c) for c in changes], next_page_token=token
        )

    # --- Operator RPCs.

    async def ListAccountSendingStates(
        self, request: pb.ListAccountSendingStatesRequest, context: aio.ServicerContext
    ) -> pb.ListAccountSendingStatesResponse:
        states, token = await self.accounts.list_states(request.page_size, request.page_token)
        return pb.ListAccountSendingStatesResponse(
            accounts=[await self._sending_state(s) for s in states], next_page_token=token
        )

    async def GetAccountSendingState(
        self, request: pb.GetAccountSendingStateRequest, context: aio.ServicerContext
    ) -> pb.GetAccountSendingStateResponse:
        account_id = require_account_id(request.account_id)
        state = await self.accounts.state(account_id)
        changes, _ = await self.accounts.changes(account_id, 50, "")
        return pb.GetAccountSendingStateResponse(
            account=await self._sending_state(state), changes=[change_message(c) for c in changes]
        )

    async def ListProductionAccessRequests(
        self, request: pb.ListProductionAccessRequestsRequest, context: aio.ServicerContext
    ) -> pb.ListProductionAccessRequestsResponse:
        cases, token = await self.access.list_requests(
            _name_of(pb.ReviewStatus, "REVIEW_STATUS", request.status), request.page_size, request.page_token
        )
        return pb.ListProductionAccessRequestsResponse(
            requests=[case_message(c) for c in cases], next_page_token=token
        )

    async def GrantProductionAccess(
        self, request: pb.GrantProductionAccessRequest, context: aio.ServicerContext
    ) -> pb.GrantProductionAccessResponse:
        case = await self.access.grant(
            request.case_id, request.max_24_hour_send, request.max_send_rate, request.note
        )
        return pb.GrantProductionAccessResponse(request=case_message(case))

    async def DenyProductionAccess(
        self, request: pb.DenyProductionAccessRequest, context: aio.ServicerContext
    ) -> pb.DenyProductionAccessResponse:
        case = await self.access.deny(request.case_id, request.note)
        return pb.DenyProductionAccessResponse(request=case_message(case))

    async def PauseAccountSending(
        self, request: pb.PauseAccountSendingRequest, context: aio.ServicerContext
    ) -> pb.PauseAccountSendingResponse:
        state = await self.accounts.set_enforcement(
            request.account_id, SHUTDOWN, request.reason or "Paused by an operator.", OPERATOR
        )
        return pb.PauseAccountSendingResponse(account=await self._sending_state(state))

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
        return pb.ReinstateAccountSendingResponse(account=await self._sending_state(state))

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
        return pb.SetAccountQuotaResponse(account=await self._sending_state(state))

    async def PutAccountSendingAttributes(
        self, request: pb.PutAccountSendingAttributesRequest, context: aio.ServicerContext
    ) -> pb.PutAccountSendingAttributesResponse:
        await self.accounts.set_sending_enabled(caller_account_id(), request.sending_enabled)
        return pb.PutAccountSendingAttributesResponse()
