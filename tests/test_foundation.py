"""The mesh foundation: services up alone and together, health, reflection, auth across accounts."""

from __future__ import annotations

import grpc
import pytest
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from postmesh.client import Client, error_details
from postmesh.feedback.v1 import feedback_pb2
from postmesh.identity.v1 import identity_pb2
from postmesh.quota.v1 import quota_pb2
from postmesh.sender.v1 import sender_pb2
from postmesh.testing import MeshThread
from tests.conftest import MeshFactory

ALL_SERVICES = {
    "postmesh.identity.v1.IdentityService",
    "postmesh.quota.v1.QuotaService",
    "postmesh.sender.v1.SenderService",
    "postmesh.feedback.v1.FeedbackService",
}


def _code(excinfo: pytest.ExceptionInfo[grpc.RpcError]) -> tuple[grpc.StatusCode, str]:
    details = error_details(excinfo.value)
    return details.code, details.reason


def _listed_services(address: str) -> set[str]:
    with grpc.insecure_channel(address) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        replies = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
        return {s.name for reply in replies for s in reply.list_services_response.service}


def test_all_services_serve_and_are_listed_by_reflection(mesh: MeshThread) -> None:
    with mesh.client() as client:
        assert client.health_status("") == "SERVING"
        for name in ALL_SERVICES:
            assert client.health_status(name) == "SERVING"
    assert ALL_SERVICES | {"grpc.health.v1.Health"} <= _listed_services(mesh.address)


@pytest.mark.parametrize("service", ["quota", "sender", "feedback"])
def test_each_service_alone_authenticates_through_identity(start_mesh: MeshFactory, service: str) -> None:
    identity = start_mesh(("identity",))
    alone = start_mesh(
        (service,),
        identity_endpoint=identity.address,
        admin_api_key=identity.admin_key,
        service_api_key=identity.service_key,
    )
    _, key = identity.create_account()
    full_name = {
        "quota": "postmesh.quota.v1.QuotaService",
        "sender": "postmesh.sender.v1.SenderService",
        "feedback": "postmesh.feedback.v1.FeedbackService",
    }[service]
    assert _listed_services(alone.address) & ALL_SERVICES == {full_name}
    with alone.client(key) as client:
        assert client.health_status(full_name) == "SERVING"
        if service == "quota":
            reply = client.quota.GetAccount(quota_pb2.GetAccountRequest())
            assert reply.send_quota.max_24_hour_send == 200 and not reply.production_access_enabled
        elif service == "sender":
            assert not client.sender.ListEmailTemplates(
                sender_pb2.ListEmailTemplatesRequest()
            ).templates_metadata
        else:
            client.feedback.ListSuppressedDestinations(feedback_pb2.ListSuppressedDestinationsRequest())
        with pytest.raises(grpc.RpcError) as excinfo:
            client.identity.GetCallerIdentity(identity_pb2.GetCallerIdentityRequest())
        assert excinfo.value.code() == grpc.StatusCode.UNIMPLEMENTED  # identity is not hosted here
    with alone.client("pm_0000_wrong") as client, pytest.raises(grpc.RpcError) as excinfo:
        client.quota.GetAccount(quota_pb2.GetAccountRequest())
    assert excinfo.value.code() in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.UNIMPLEMENTED)


@pytest.mark.parametrize(
    "api_key,reason",
    [("", "MISSING_API_KEY"), ("not-a-key", "INVALID_API_KEY"), ("pm_abcdef_wrongsecret", "INVALID_API_KEY")],
)
def test_missing_or_malformed_key_is_unauthenticated(mesh: MeshThread, api_key: str, reason: str) -> None:
    with mesh.client(api_key) as client:
        for call in (
            lambda: client.quota.GetAccount(quota_pb2.GetAccountRequest()),
            lambda: client.identity.GetCallerIdentity(identity_pb2.GetCallerIdentityRequest()),
            lambda: client.sender.ListEmailTemplates(sender_pb2.ListEmailTemplatesRequest()),
            lambda: client.feedback.ListSuppressedDestinations(
                feedback_pb2.ListSuppressedDestinationsRequest()
            ),
        ):
            with pytest.raises(grpc.RpcError) as excinfo:
                call()
            assert _code(excinfo) == (grpc.StatusCode.UNAUTHENTICATED, reason)


def test_wrong_scheme_is_unauthenticated(mesh: MeshThread) -> None:
    _, key = mesh.create_account()
    with grpc.insecure_channel(mesh.address) as channel:
        stub = Client(mesh.address).quota.__class__(channel)
        with pytest.raises(grpc.RpcError) as excinfo:
            stub.GetAccount(quota_pb2.GetAccountRequest(), metadata=(("authorization", f"Basic {key}"),))
    assert excinfo.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_revoked_and_rotated_keys_stop_working_at_once(mesh: MeshThread) -> None:
    _, key = mesh.create_account()
    with mesh.client(key) as client:
        whoami = client.identity.GetCallerIdentity(identity_pb2.GetCallerIdentityRequest())
        client.quota.GetAccount(quota_pb2.GetAccountRequest())  # now cached by the quota service
        second = client.identity.CreateApiKey(identity_pb2.CreateApiKeyRequest(description="ci"))
        rotated = client.identity.RotateApiKey(identity_pb2.RotateApiKeyRequest(key_id=whoami.key_id))
        assert rotated.revoked_key_id == whoami.key_id
    # The revocation event clears every service's cache, not only identity's.
    with mesh.client(key) as old:
        for call in (
            lambda: old.identity.GetCallerIdentity(identity_pb2.GetCallerIdentityRequest()),
            lambda: old.quota.GetAccount(quota_pb2.GetAccountRequest()),
        ):
            with pytest.raises(grpc.RpcError) as excinfo:
                call()
            assert excinfo.value.code() == grpc.StatusCode.UNAUTHENTICATED
    with mesh.client(rotated.api_key_secret) as new:
        assert new.identity.GetCallerIdentity(identity_pb2.GetCallerIdentityRequest()).account.account_id
        new.identity.RevokeApiKey(identity_pb2.RevokeApiKeyRequest(key_id=second.api_key.key_id))
        keys = new.identity.ListApiKeys(identity_pb2.ListApiKeysRequest(include_revoked=True)).api_keys
        assert {k.key_id: k.revoked for k in keys} == {
            whoami.key_id: True,
            second.api_key.key_id: True,
            rotated.api_key.key_id: False,
        }
    with mesh.client(second.api_key_secret) as revoked, pytest.raises(grpc.RpcError) as excinfo:
        revoked.quota.GetAccount(quota_pb2.GetAccountRequest())
    assert _code(excinfo)[0] == grpc.StatusCode.UNAUTHENTICATED


def test_another_accounts_resources_are_not_found(mesh: MeshThread) -> None:
    _, key_a = mesh.create_account("a")
    _, key_b = mesh.create_account("b")
    content = sender_pb2.EmailTemplateContent(subject="Hi", text="Hello")
    with mesh.client(key_a) as a, mesh.client(key_b) as b:
        a.sender.CreateEmailTemplate(
            sender_pb2.CreateEmailTemplateRequest(template_name="welcome", template_content=content)
        )
        a.feedback.PutSuppressedDestination(
            feedback_pb2.PutSuppressedDestinationRequest(
                email_address="gone@example.test", reason=feedback_pb2.SUPPRESSION_LIST_REASON_BOUNCE
            )
        )
        a_key_id = a.identity.GetCallerIdentity(identity_pb2.GetCallerIdentityRequest()).key_id
        for call in (
            lambda: b.sender.GetEmailTemplate(sender_pb2.GetEmailTemplateRequest(template_name="welcome")),
            lambda: b.sender.DeleteEmailTemplate(
                sender_pb2.DeleteEmailTemplateRequest(template_name="welcome")
            ),
            lambda: b.feedback.GetSuppressedDestination(
                feedback_pb2.GetSuppressedDestinationRequest(email_address="gone@example.test")
            ),
            lambda: b.identity.RevokeApiKey(identity_pb2.RevokeApiKeyRequest(key_id=a_key_id)),
        ):
            with pytest.raises(grpc.RpcError) as excinfo:
                call()
            assert excinfo.value.code() == grpc.StatusCode.NOT_FOUND
        assert not b.sender.ListEmailTemplates(sender_pb2.ListEmailTemplatesRequest()).templates_metadata
        assert [
            t.template_name
            for t in a.sender.ListEmailTemplates(sender_pb2.ListEmailTemplatesRequest()).templates_metadata
        ] == ["welcome"]
        # A still has them: B's attempts changed nothing.
        a.identity.GetCallerIdentity(identity_pb2.GetCallerIdentityRequest())
        a.sender.GetEmailTemplate(sender_pb2.GetEmailTemplateRequest(template_name="welcome"))


def test_admin_operations_need_the_admin_credential(mesh: MeshThread) -> None:
    _, key = mesh.create_account()
    with mesh.client(key) as account, pytest.raises(grpc.RpcError) as excinfo:
        account.identity.CreateAccount(identity_pb2.CreateAccountRequest(name="x"))
    assert _code(excinfo) == (grpc.StatusCode.PERMISSION_DENIED, "ADMIN_ONLY")
    with mesh.client(key) as account, pytest.raises(grpc.RpcError) as excinfo:
        account.identity.AuthenticateApiKey(identity_pb2.AuthenticateApiKeyRequest(api_key=key))
    assert _code(excinfo) == (grpc.StatusCode.PERMISSION_DENIED, "INTERNAL_ONLY")
    with mesh.admin() as admin:
        with pytest.raises(grpc.RpcError) as excinfo:
            admin.quota.GetAccount(quota_pb2.GetAccountRequest())
        assert excinfo.value.code() == grpc.StatusCode.PERMISSION_DENIED
        listed = admin.identity.ListAccounts(identity_pb2.ListAccountsRequest())
        assert len(listed.accounts) == 1


def test_service_credential_acts_only_internally_or_for_a_named_account(mesh: MeshThread) -> None:
    account_id, _ = mesh.create_account()
    with Client(mesh.address, mesh.service_key) as service:
        with pytest.raises(grpc.RpcError) as excinfo:
            service.quota.GetAccount(quota_pb2.GetAccountRequest())
        assert excinfo.value.code() == grpc.StatusCode.PERMISSION_DENIED
        reply = service.quota.GetAccount(
            quota_pb2.GetAccountRequest(), metadata=(("x-postmesh-account", account_id),)
        )
        assert reply.sending_enabled
        check = service.feedback.CheckSuppressedDestinations(
            feedback_pb2.CheckSuppressedDestinationsRequest(
                account_id=account_id, email_addresses=["a@b.test"]
            )
        )
        assert not check.suppressed


def test_malformed_fields_are_invalid_argument_naming_the_field(mesh: MeshThread) -> None:
    _, key = mesh.create_account()
    with mesh.client(key) as client, mesh.admin() as admin:
        cases = [
            (lambda: admin.identity.CreateAccount(identity_pb2.CreateAccountRequest(name="")), "name"),
            (lambda: client.identity.RevokeApiKey(identity_pb2.RevokeApiKeyRequest()), "key_id"),
            (
                lambda: client.identity.ListApiKeys(identity_pb2.ListApiKeysRequest(page_token="%%%")),
                "page_token",
            ),
            (lambda: client.identity.ListApiKeys(identity_pb2.ListApiKeysRequest(page_size=-1)), "page_size"),
            (
                lambda: client.sender.CreateEmailTemplate(
                    sender_pb2.CreateEmailTemplateRequest(
                        template_name="bad name!",
                        template_content=sender_pb2.EmailTemplateContent(subject="s", text="t"),
                    )
                ),
                "template_name",
            ),
            (
                lambda: client.feedback.PutSuppressedDestination(
                    feedback_pb2.PutSuppressedDestinationRequest(
                        email_address="no-at-sign", reason=feedback_pb2.SUPPRESSION_LIST_REASON_BOUNCE
                    )
                ),
                "email_address",
            ),
        ]
        for call, field in cases:
            with pytest.raises(grpc.RpcError) as excinfo:
                call()
            details = error_details(excinfo.value)
            assert details.code == grpc.StatusCode.INVALID_ARGUMENT, field
            assert details.metadata.get("field") == field


def test_pagination_walks_every_item_once(mesh: MeshThread) -> None:
    _, key = mesh.create_account()
    with mesh.client(key) as client:
        names = [f"t{i:02d}" for i in range(7)]
        for name in names:
            client.sender.CreateEmailTemplate(
                sender_pb2.CreateEmailTemplateRequest(
                    template_name=name,
                    template_content=sender_pb2.EmailTemplateContent(subject="s", text="t"),
                )
            )
        seen, token = [], ""
        while True:
            page = client.sender.ListEmailTemplates(
                sender_pb2.ListEmailTemplatesRequest(page_size=3, page_token=token)
            )
            seen += [t.template_name for t in page.templates_metadata]
            token = page.next_page_token
            if not token:
                break
        assert seen == names
