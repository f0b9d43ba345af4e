"""Production access requests, operator decisions and controls, and who may call what."""

from __future__ import annotations

import grpc
import pytest

from postmesh.client import Client, error_details
from postmesh.quota.v1 import quota_pb2 as pb
from postmesh.testing import MeshThread
from tests.conftest import MeshFactory


def _details(**overrides: object) -> pb.PutAccountDetailsRequest:
    fields: dict[str, object] = {
        "mail_type": pb.MAIL_TYPE_TRANSACTIONAL,
        "website_url": "https://shop.example.test",
        "use_case_description": "Order confirmations and password resets for our customers.",
        "additional_contact_email_addresses": ["ops@shop.example.test"],
        "production_access_enabled": True,
        "expected_daily_volume": 5000,
    }
    fields.update(overrides)
    return pb.PutAccountDetailsRequest(**fields)  # type: ignore[arg-type]


def _code(call: object) -> tuple[grpc.StatusCode, str, str | None]:
    with pytest.raises(grpc.RpcError) as excinfo:
        call()  # type: ignore[operator]
    details = error_details(excinfo.value)
    return details.code, details.reason, details.metadata.get("field")


def test_production_access_request_granted_by_an_operator(mesh: MeshThread) -> None:
    account_id, key = mesh.create_account()
    with mesh.client(key) as client, mesh.admin() as admin:
        filed = client.quota.PutAccountDetails(_details()).review_details
        assert filed.status == pb.REVIEW_STATUS_PENDING and filed.case_id
        account = client.quota.GetAccount(pb.GetAccountRequest())
        assert not account.production_access_enabled
        assert account.details.website_url == "https://shop.example.test"
        assert account.details.contact_language == pb.CONTACT_LANGUAGE_EN
        assert list(account.details.additional_contact_email_addresses) == ["ops@shop.example.test"]
        assert account.details.review_details.case_id == filed.case_id
        # Filing again while pending updates the same case.
        again = client.quota.PutAccountDetails(_details(expected_daily_volume=8000)).review_details
        assert again.case_id == filed.case_id

        pending = admin.quota.ListProductionAccessRequests(
            pb.ListProductionAccessRequestsRequest(status=pb.REVIEW_STATUS_PENDING)
        ).requests
        assert [(r.case_id, r.account_id, r.details.expected_daily_volume) for r in pending] == [
            (filed.case_id, account_id, 8000)
        ]
        granted = admin.quota.GrantProductionAccess(
            pb.GrantProductionAccessRequest(case_id=filed.case_id, note="looks legitimate")
        ).request
        assert granted.status == pb.REVIEW_STATUS_GRANTED and granted.decide_time.seconds
        account = client.quota.GetAccount(pb.GetAccountRequest())
        assert account.production_access_enabled
        assert (account.send_quota.max_24_hour_send, account.send_quota.max_send_rate) == (50000, 14)
        assert account.details.review_details.status == pb.REVIEW_STATUS_GRANTED
        # A decided case cannot be decided again.
        assert _code(
            lambda: admin.quota.DenyProductionAccess(pb.DenyProductionAccessRequest(case_id=filed.case_id))
        )[:2] == (grpc.StatusCode.FAILED_PRECONDITION, "REQUEST_ALREADY_DECIDED")
        changes = client.quota.ListAccountChanges(pb.ListAccountChangesRequest()).changes
        assert changes[0].kind == "PRODUCTION_ACCESS" and "looks legitimate" in changes[0].reason
        assert changes[0].actor == "operator" and changes[0].max_24_hour_send == 50000
    with Client(mesh.address, mesh.service_key) as service:
        reply = service.quota.ReserveSendQuota(pb.ReserveSendQuotaRequest(account_id=account_id, messages=1))
        assert reply.production_access_enabled


def test_denied_request_keeps_the_sandbox_and_a_new_one_can_be_filed(mesh: MeshThread) -> None:
    _, key = mesh.create_account()
    with mesh.client(key) as client, mesh.admin() as admin:
        case_id = client.quota.PutAccountDetails(_details()).review_details.case_id
        denied = admin.quota.DenyProductionAccess(
            pb.DenyProductionAccessRequest(case_id=case_id, note="no website content")
        ).request
        assert denied.status == pb.REVIEW_STATUS_DENIED and denied.decision_note == "no website content"
        account = client.quota.GetAccount(pb.GetAccountRequest())
        assert not account.production_access_enabled and account.send_quota.max_24_hour_send == 200
        assert account.details.review_details.status == pb.REVIEW_STATUS_DENIED
        second = client.quota.PutAccountDetails(_details()).review_details
        assert second.case_id != case_id and second.status == pb.REVIEW_STATUS_PENDING
        listed = admin.quota.ListProductionAccessRequests(pb.ListProductionAccessRequestsRequest()).requests
        assert [r.case_id for r in listed][:2] == [second.case_id, case_id]  # newest first
        # Details alone (no request) file nothing.
        _, other_key = mesh.create_account("other")
        with mesh.client(other_key) as other:
            reply = other.quota.PutAccountDetails(_details(production_access_enabled=False))
            assert reply.review_details.status == pb.REVIEW_STATUS_UNSPECIFIED


def test_auto_approval_rule(start_mesh: MeshFactory) -> None:
    mesh = start_mesh(production_access_auto_approve_max_volume=10000)
    _, key = mesh.create_account()
    _, big_key = mesh.create_account("big")
    with mesh.client(key) as client, mesh.client(big_key) as big:
        review = client.quota.PutAccountDetails(_details(expected_daily_volume=10000)).review_details
        assert review.status == pb.REVIEW_STATUS_GRANTED
        assert client.quota.GetAccount(pb.GetAccountRequest()).production_access_enabled
        changes = client.quota.ListAccountChanges(pb.ListAccountChangesRequest()).changes
        assert changes[0].actor == "system" and "automatically" in changes[0].reason
        # Above the rule's volume an operator decides.
        assert big.quota.PutAccountDetails(_details(expected_daily_volume=10001)).review_details.status == (
            pb.REVIEW_STATUS_PENDING
        )


def test_bad_account_details_name_the_field(mesh: MeshThread) -> None:
    _, key = mesh.create_account()
    with mesh.client(key) as client:
        for request, field in [
            (_details(mail_type=pb.MAIL_TYPE_UNSPECIFIED), "mail_type"),
            (_details(website_url="ftp://shop.example.test"), "website_url"),
            (_details(website_url=""), "website_url"),
            (_details(use_case_description=""), "use_case_description"),
            (
                _details(additional_contact_email_addresses=["not-an-address"]),
                "additional_contact_email_addresses",
            ),
            (
                _details(additional_contact_email_addresses=[f"a{i}@x.example.test" for i in range(5)]),
                "additional_contact_email_addresses",
            ),
            (_details(expected_daily_volume=-1), "expected_daily_volume"),
        ]:
            assert _code(lambda request=request: client.quota.PutAccountDetails(request)) == (
                grpc.StatusCode.INVALID_ARGUMENT,
                "BAD_REQUEST",
                field,
            ), field
        # Nothing half-stored: the account has no details and no case.
        account = client.quota.GetAccount(pb.GetAccountRequest())
        assert not account.details.website_url and not account.details.review_details.case_id


def test_operator_controls(mesh: MeshThread) -> None:
    account_id, key = mesh.create_account()
    with mesh.admin() as admin, mesh.client(key) as client:
        state = admin.quota.SetAccountQuota(
            pb.SetAccountQuotaRequest(
                account_id=account_id, max_24_hour_send=1000, max_send_rate=5, reason="pilot"
            )
        ).account
        assert (state.send_quota.max_24_hour_send, state.send_quota.max_send_rate) == (1000, 5)
        paused = admin.quota.PauseAccountSending(
            pb.PauseAccountSendingRequest(account_id=account_id, reason="abuse report")
        ).account
        assert not paused.sending_enabled and paused.enforcement_status == pb.ENFORCEMENT_STATUS_SHUTDOWN
        assert paused.enforcement_reason == "abuse report"
        listed = admin.quota.ListAccountSendingStates(pb.ListAccountSendingStatesRequest()).accounts
        assert [(a.account_id, a.sending_enabled) for a in listed] == [(account_id, False)]
        reinstated = admin.quota.ReinstateAccountSending(
            pb.ReinstateAccountSendingRequest(account_id=account_id)
        ).account
        assert reinstated.sending_enabled and reinstated.enforcement_status == pb.ENFORCEMENT_STATUS_HEALTHY
        got = admin.quota.GetAccountSendingState(pb.GetAccountSendingStateRequest(account_id=account_id))
        assert [(c.kind, c.actor) for c in got.changes] == [
            ("ENFORCEMENT", "operator"),
            ("ENFORCEMENT", "operator"),
            ("QUOTA", "operator"),
        ]
        # The account sees the same history, newest first, page by page.
        first = client.quota.ListAccountChanges(pb.ListAccountChangesRequest(page_size=2))
        rest = client.quota.ListAccountChanges(
            pb.ListAccountChangesRequest(page_size=2, page_token=first.next_page_token)
        )
        assert [c.reason for c in [*first.changes, *rest.changes]] == [
            "Reinstated by an operator.",
            "abuse report",
            "pilot",
        ]
        assert not rest.next_page_token
        for call, field in [
            (
                lambda: admin.quota.SetAccountQuota(
                    pb.SetAccountQuotaRequest(account_id=account_id, max_send_rate=1)
                ),
                "max_24_hour_send",
            ),
            (
                lambda: admin.quota.SetAccountQuota(
                    pb.SetAccountQuotaRequest(account_id=account_id, max_24_hour_send=1)
                ),
                "max_send_rate",
            ),
            (lambda: admin.quota.PauseAccountSending(pb.PauseAccountSendingRequest()), "account_id"),
            (lambda: admin.quota.GrantProductionAccess(pb.GrantProductionAccessRequest()), "case_id"),
            (
                lambda: admin.quota.ListAccountSendingStates(
                    pb.ListAccountSendingStatesRequest(page_token="%%")
                ),
                "page_token",
            ),
        ]:
            assert _code(call)[::2] == (grpc.StatusCode.INVALID_ARGUMENT, field)
        assert (
            _code(lambda: admin.quota.GrantProductionAccess(pb.GrantProductionAccessRequest(case_id="nope")))[
                0
            ]
            == grpc.StatusCode.NOT_FOUND
        )


def test_admin_rpcs_need_the_admin_credential(mesh: MeshThread) -> None:
    account_id, key = mesh.create_account()
    calls = [
        lambda c: c.quota.ListAccountSendingStates(pb.ListAccountSendingStatesRequest()),
        lambda c: c.quota.GetAccountSendingState(pb.GetAccountSendingStateRequest(account_id=account_id)),
        lambda c: c.quota.ListProductionAccessRequests(pb.ListProductionAccessRequestsRequest()),
        lambda c: c.quota.GrantProductionAccess(pb.GrantProductionAccessRequest(case_id="x")),
        lambda c: c.quota.DenyProductionAccess(pb.DenyProductionAccessRequest(case_id="x")),
        lambda c: c.quota.PauseAccountSending(pb.PauseAccountSendingRequest(account_id=account_id)),
        lambda c: c.quota.ReinstateAccountSending(pb.ReinstateAccountSendingRequest(account_id=account_id)),
        lambda c: c.quota.SetAccountQuota(
            pb.SetAccountQuotaRequest(account_id=account_id, max_24_hour_send=1e6, max_send_rate=100)
        ),
    ]
    with mesh.client(key) as account, Client(mesh.address, mesh.service_key) as service:
        for call in calls:
            assert _code(lambda call=call: call(account))[:2] == (
                grpc.StatusCode.PERMISSION_DENIED,
                "ADMIN_ONLY",
            )
            assert _code(lambda call=call: call(service))[0] == grpc.StatusCode.PERMISSION_DENIED
        # Nothing changed.
        reply = account.quota.GetAccount(pb.GetAccountRequest())
        assert reply.sending_enabled and reply.send_quota.max_24_hour_send == 200
    with mesh.admin() as admin:
        assert _code(lambda: admin.quota.PutAccountDetails(pb.PutAccountDetailsRequest()))[0] == (
            grpc.StatusCode.PERMISSION_DENIED
        )
