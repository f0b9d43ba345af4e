"""Email identities: domains verified through a DNS server on loopback, the internal checks the sender
and delivery workers call, sending authorization, MAIL FROM, and bad input."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator

import grpc
import pytest

from postmesh.identity.v1 import identity_pb2 as pb
from postmesh.testing import MeshThread
from postmesh.testing_mail import LoopbackDns
from tests.conftest import MeshFactory
from tests.identity_helpers import authorize, create_verified_domain, internal, publish, rpc_error


@pytest.fixture
def dns() -> Iterator[LoopbackDns]:
    server = LoopbackDns().start()
    yield server
    server.stop()


@pytest.fixture
def idmesh(start_mesh: MeshFactory, dns: LoopbackDns) -> MeshThread:
    # The background checker stays out of the way: tests check on demand unless they test it.
    return start_mesh(dns_resolver=dns.address, dns_check_poll_seconds=3600, dns_timeout_seconds=2)


def test_domain_verifies_through_dns_and_then_covers_its_addresses(
    idmesh: MeshThread, dns: LoopbackDns
) -> None:
    account_id, key = idmesh.create_account()
    with idmesh.client(key) as client, internal(idmesh) as service:
        created = client.identity.CreateEmailIdentity(
            pb.CreateEmailIdentityRequest(
                email_identity="Example.TEST.",
                dkim_signing_attributes=pb.DkimSigningAttributes(include_ed25519=True),
            )
        )
        assert created.email_identity == "example.test"
        assert created.identity_type == pb.IDENTITY_TYPE_DOMAIN
        assert not created.verified_for_sending_status
        assert created.dkim_attributes.status == pb.VERIFICATION_STATUS_PENDING
        assert created.dkim_attributes.signing_attributes_origin == pb.DKIM_SIGNING_ATTRIBUTES_ORIGIN_POSTMESH
        algorithms = sorted(k.algorithm for k in created.dkim_attributes.keys)
        assert algorithms == ["ed25519-sha256", "rsa-sha256"]
        records = {(r.name, r.type, r.purpose) for r in created.dns_records}
        assert ("_postmesh.example.test", "TXT", "verification") in records
        for selector in created.dkim_attributes.tokens:
            assert (f"{selector}._domainkey.example.test", "TXT", "dkim") in records

        # Nothing published yet: still pending, and nothing may be sent or signed.
        pending = client.identity.CheckEmailIdentityVerification(
            pb.CheckEmailIdentityVerificationRequest(email_identity="example.test")
        ).identity
        assert pending.verification_status == pb.VERIFICATION_STATUS_PENDING
        assert pending.verification_info.error_type == pb.VERIFICATION_ERROR_HOST_NOT_FOUND
        code, reason, message, _ = rpc_error(lambda: authorize(service, account_id, "news@example.test"))
        assert (code, reason) == (grpc.StatusCode.FAILED_PRECONDITION, "MESSAGE_REJECTED")
        assert message == (
            "Email address is not verified. The following identities failed the check: news@example.test"
        )
        signing = service.identity.GetSigningConfig(
            pb.GetSigningConfigRequest(account_id=account_id, domain="example.test")
        )
        assert not signing.keys

        # A wrong token is not enough.
        dns.publish("_postmesh.example.test", "TXT", "postmesh-verification=not-the-token")
        wrong = client.identity.CheckEmailIdentityVerification(
            pb.CheckEmailIdentityVerificationRequest(email_identity="example.test")
        ).identity
        assert wrong.verification_status == pb.VERIFICATION_STATUS_PENDING
        assert wrong.verification_info.error_type == pb.VERIFICATION_ERROR_INVALID_VALUE

        publish(dns, created.dns_records)
        verified = client.identity.CheckEmailIdentityVerification(
            pb.CheckEmailIdentityVerificationRequest(email_identity="example.test")
        ).identity
        assert verified.verification_status == pb.VERIFICATION_STATUS_SUCCESS
        assert verified.verified_for_sending_status
        assert verified.dkim_attributes.status == pb.VERIFICATION_STATUS_SUCCESS
        assert all(r.found for r in verified.dns_records)

        # Every address at the domain, and at its subdomains, is covered by it.
        for address in ("news@example.test", "Someone@EXAMPLE.test", "x@mail.example.test"):
            reply = authorize(service, account_id, address)
            assert (reply.identity, reply.identity_owner_account_id, reply.mail_from_domain) == (
                "example.test",
                account_id,
                "",
            )
        code, reason, _, _ = rpc_error(lambda: authorize(service, account_id, "a@example-other.test"))
        assert reason == "MESSAGE_REJECTED"

        signing = service.identity.GetSigningConfig(
            pb.GetSigningConfigRequest(account_id=account_id, domain="mail.example.test")
        )
        assert signing.domain == "example.test"
        by_algorithm = {k.algorithm: k for k in signing.keys}
        assert set(by_algorithm) == {"rsa-sha256", "ed25519-sha256"}
        assert by_algorithm["rsa-sha256"].private_key_pem.startswith("-----BEGIN PRIVATE KEY-----")
        assert {k.selector for k in signing.keys} == set(created.dkim_attributes.tokens)

        # Turning signing off empties the signing config; the domain stays verified.
        client.identity.PutEmailIdentityDkimAttributes(
            pb.PutEmailIdentityDkimAttributesRequest(email_identity="example.test", signing_enabled=False)
        )
        assert not service.identity.GetSigningConfig(
            pb.GetSigningConfigRequest(account_id=account_id, domain="example.test")
        ).keys
        assert authorize(service, account_id, "news@example.test").identity == "example.test"


def test_address_identities_and_sandbox_recipients(idmesh: MeshThread, dns: LoopbackDns) -> None:
    account_id, key = idmesh.create_account()
    with idmesh.client(key) as client, internal(idmesh) as service:
        created = client.identity.CreateEmailIdentity(
            pb.CreateEmailIdentityRequest(email_identity="Ann@Home.test")
        )
        assert created.email_identity == "Ann@home.test"
        assert created.identity_type == pb.IDENTITY_TYPE_EMAIL_ADDRESS
        got = client.identity.GetEmailIdentity(pb.GetEmailIdentityRequest(email_identity="ann@home.test"))
        assert got.verification_status == pb.VERIFICATION_STATUS_PENDING
        assert got.verification_info.HasField("expire_timestamp")
        check = service.identity.CheckVerifiedRecipients(
            pb.CheckVerifiedRecipientsRequest(
                account_id=account_id, email_addresses=["ann@home.test", "bob@corp.test", "not an address"]
            )
        )
        assert list(check.unverified) == ["ann@home.test", "bob@corp.test", "not an address"]

        create_verified_domain(client, dns, "corp.test")
        check = service.identity.CheckVerifiedRecipients(
            pb.CheckVerifiedRecipientsRequest(
                account_id=account_id, email_addresses=["ann@home.test", "Bob@Corp.test", "c@eu.corp.test"]
            )
        )
        assert list(check.unverified) == ["ann@home.test"]
        # An address identity at a verified domain is verified with it, without any message.
        at_domain = client.identity.CreateEmailIdentity(
            pb.CreateEmailIdentityRequest(email_identity="desk@corp.test")
        )
        assert at_domain.verified_for_sending_status
        assert authorize(service, account_id, "desk@corp.test").identity == "desk@corp.test"
        # Another account's verified identities do not count.
        other_id, _ = idmesh.create_account("other")
        check = service.identity.CheckVerifiedRecipients(
            pb.CheckVerifiedRecipientsRequest(account_id=other_id, email_addresses=["bob@corp.test"])
        )
        assert list(check.unverified) == ["bob@corp.test"]
        # The address was verified through its domain only: without the domain it is not.
        client.identity.DeleteEmailIdentity(pb.DeleteEmailIdentityRequest(email_identity="corp.test"))
        desk = client.identity.GetEmailIdentity(pb.GetEmailIdentityRequest(email_identity="desk@corp.test"))
        assert desk.verification_status == pb.VERIFICATION_STATUS_NOT_STARTED
        assert not desk.verified_for_sending_status
        assert rpc_error(lambda: authorize(service, account_id, "desk@corp.test"))[1] == "MESSAGE_REJECTED"


def test_create_get_list_delete_and_bad_input(idmesh: MeshThread) -> None:
    account_id, key = idmesh.create_account()
    _, other_key = idmesh.create_account("other")
    with idmesh.client(key) as client, idmesh.client(other_key) as other:
        for bad in (
            "",
            "no-tld",
            "a@",
            "@example.test",
            "a b@example.test",
            "exa_mple.test",
            "a@b@c.test",
            "x" * 300 + ".test",
        ):
            code, _, _, metadata = rpc_error(
                lambda bad=bad: client.identity.CreateEmailIdentity(
                    pb.CreateEmailIdentityRequest(email_identity=bad)
                )
            )
            assert code == grpc.StatusCode.INVALID_ARGUMENT, bad
            assert metadata.get("field") == "email_identity"
        idn = client.identity.CreateEmailIdentity(pb.CreateEmailIdentityRequest(email_identity="bücher.test"))
        assert idn.email_identity == "xn--bcher-kva.test"
        code, reason, _, _ = rpc_error(
            lambda: client.identity.CreateEmailIdentity(
                pb.CreateEmailIdentityRequest(email_identity="BÜCHER.test")
            )
        )
        assert (code, reason) == (grpc.StatusCode.ALREADY_EXISTS, "ALREADY_EXISTS")
        code, _, _, metadata = rpc_error(
            lambda: client.identity.CreateEmailIdentity(
                pb.CreateEmailIdentityRequest(
                    email_identity="a@x.test",
                    dkim_signing_attributes=pb.DkimSigningAttributes(include_ed25519=True),
                )
            )
        )
        assert code == grpc.StatusCode.INVALID_ARGUMENT and metadata["field"] == "dkim_signing_attributes"
        assert [
            i.identity_name
            for i in client.identity.ListEmailIdentities(pb.ListEmailIdentitiesRequest()).email_identities
        ] == ["xn--bcher-kva.test"]

        names = [f"d{i}.example.test" for i in range(5)]
        for name in names:
            client.identity.CreateEmailIdentity(pb.CreateEmailIdentityRequest(email_identity=name))
        seen, token = [], ""
        while True:
            page = client.identity.ListEmailIdentities(
                pb.ListEmailIdentitiesRequest(page_size=2, page_token=token)
            )
            seen += [i.identity_name for i in page.email_identities]
            token = page.next_page_token
            if not token:
                break
        assert seen == sorted([*names, "xn--bcher-kva.test"])

        # Another account sees none of it and can delete none of it.
        for call in (
            lambda: other.identity.GetEmailIdentity(pb.GetEmailIdentityRequest(email_identity="bücher.test")),
            lambda: other.identity.DeleteEmailIdentity(
                pb.DeleteEmailIdentityRequest(email_identity="bücher.test")
            ),
            lambda: other.identity.GetEmailIdentityPolicies(
                pb.GetEmailIdentityPoliciesRequest(email_identity="bücher.test")
            ),
        ):
            assert rpc_error(call)[0] == grpc.StatusCode.NOT_FOUND
        assert not other.identity.ListEmailIdentities(pb.ListEmailIdentitiesRequest()).email_identities

        client.identity.DeleteEmailIdentity(
            pb.DeleteEmailIdentityRequest(email_identity="xn--bcher-kva.test")
        )
        assert (
            rpc_error(
                lambda: client.identity.GetEmailIdentity(
                    pb.GetEmailIdentityRequest(email_identity="bücher.test")
                )
            )[0]
            == grpc.StatusCode.NOT_FOUND
        )
        assert (
            rpc_error(
                lambda: client.identity.DeleteEmailIdentity(
                    pb.DeleteEmailIdentityRequest(email_identity="bücher.test")
                )
            )[0]
            == grpc.StatusCode.NOT_FOUND
        )
    with internal(idmesh) as service:
        checks: list[tuple[Callable[[], object], str]] = [
            (lambda: authorize(service, account_id, "not-an-address"), "from_address"),
            (lambda: authorize(service, "", "a@b.test"), "account_id"),
            (
                lambda: service.identity.GetSigningConfig(
                    pb.GetSigningConfigRequest(account_id=account_id, domain="x")
                ),
                "domain",
            ),
        ]
        for check, field in checks:
            code, _, _, metadata = rpc_error(check)
            assert code == grpc.StatusCode.INVALID_ARGUMENT and metadata.get("field") == field
    with idmesh.client(key) as client:
        # The internal RPCs are not for API keys.
        code, reason, _, _ = rpc_error(lambda: authorize(client, account_id, "a@b.test"))
        assert (code, reason) == (grpc.StatusCode.PERMISSION_DENIED, "INTERNAL_ONLY")


def test_same_domain_in_two_accounts_shares_nothing(idmesh: MeshThread, dns: LoopbackDns) -> None:
    a_id, a_key = idmesh.create_account("a")
    b_id, b_key = idmesh.create_account("b")
    with idmesh.client(a_key) as a, idmesh.client(b_key) as b, internal(idmesh) as service:
        a_created = a.identity.CreateEmailIdentity(
            pb.CreateEmailIdentityRequest(email_identity="shared.test")
        )
        b_verified = create_verified_domain(b, dns, "shared.test")
        a_values = {r.value for r in a_created.dns_records}
        assert not a_values & {r.value for r in b_verified.dns_records}
        # B's records are published, A's are not: A stays unverified and cannot send or sign.
        a_checked = a.identity.CheckEmailIdentityVerification(
            pb.CheckEmailIdentityVerificationRequest(email_identity="shared.test")
        ).identity
        assert a_checked.verification_status == pb.VERIFICATION_STATUS_PENDING
        assert rpc_error(lambda: authorize(service, a_id, "x@shared.test"))[1] == "MESSAGE_REJECTED"
        assert not service.identity.GetSigningConfig(
            pb.GetSigningConfigRequest(account_id=a_id, domain="shared.test")
        ).keys
        assert authorize(service, b_id, "x@shared.test").identity_owner_account_id == b_id
        b_keys = service.identity.GetSigningConfig(
            pb.GetSigningConfigRequest(account_id=b_id, domain="shared.test")
        ).keys
        assert {k.selector for k in b_keys} == set(b_verified.dkim_attributes.tokens)
        assert not set(a_created.dkim_attributes.tokens) & set(b_verified.dkim_attributes.tokens)


def test_sending_authorization_policies(idmesh: MeshThread, dns: LoopbackDns) -> None:
    owner_id, owner_key = idmesh.create_account("owner")
    user_id, user_key = idmesh.create_account("user")
    _, stranger_key = idmesh.create_account("stranger")
    with idmesh.client(owner_key) as owner, idmesh.client(user_key), internal(idmesh) as service:
        create_verified_domain(owner, dns, "brand.test")
        assert (
            rpc_error(lambda: authorize(service, user_id, "news@brand.test", "brand.test"))[1]
            == "MESSAGE_REJECTED"
        )
        allow = {
            "Version": "2012-10-17",
            "Statement": [
                {
                    "Sid": "AllowUser",
                    "Effect": "Allow",
                    "Principal": {"AWS": [f"arn:aws:iam::{user_id}:root"]},
                    "Action": ["ses:SendEmail", "ses:SendRawEmail"],
                }
            ],
        }
        owner.identity.PutEmailIdentityPolicy(
            pb.PutEmailIdentityPolicyRequest(
                email_identity="brand.test", policy_name="user", policy=json.dumps(allow)
            )
        )
        reply = authorize(service, user_id, "news@brand.test", "brand.test")
        assert (reply.identity, reply.identity_owner_account_id) == ("brand.test", owner_id)
        arn = f"arn:aws:ses:local:{owner_id}:identity/brand.test"
        assert authorize(service, user_id, "news@brand.test", arn).identity_owner_account_id == owner_id
        # The identity named must cover the address, and without from_identity only own identities count.
        assert (
            rpc_error(lambda: authorize(service, user_id, "news@other.test", "brand.test"))[1]
            == "MESSAGE_REJECTED"
        )
        assert rpc_error(lambda: authorize(service, user_id, "news@brand.test"))[1] == "MESSAGE_REJECTED"
        assert list(
            owner.identity.GetEmailIdentityPolicies(
                pb.GetEmailIdentityPoliciesRequest(email_identity="brand.test")
            ).policies
        ) == ["user"]
        assert (
            "user"
            in owner.identity.GetEmailIdentity(
                pb.GetEmailIdentityRequest(email_identity="brand.test")
            ).policies
        )

        # A Deny naming the account wins over the Allow.
        deny = {"Statement": {"Effect": "Deny", "Principal": {"AWS": user_id}, "Action": "ses:*"}}
        owner.identity.PutEmailIdentityPolicy(
            pb.PutEmailIdentityPolicyRequest(
                email_identity="brand.test", policy_name="deny", policy=json.dumps(deny)
            )
        )
        assert (
            rpc_error(lambda: authorize(service, user_id, "a@brand.test", "brand.test"))[1]
            == "MESSAGE_REJECTED"
        )
        owner.identity.DeleteEmailIdentityPolicy(
            pb.DeleteEmailIdentityPolicyRequest(email_identity="brand.test", policy_name="deny")
        )
        assert authorize(service, user_id, "a@brand.test", "brand.test").identity == "brand.test"
        owner.identity.DeleteEmailIdentityPolicy(
            pb.DeleteEmailIdentityPolicyRequest(email_identity="brand.test", policy_name="user")
        )
        assert (
            rpc_error(lambda: authorize(service, user_id, "a@brand.test", "brand.test"))[1]
            == "MESSAGE_REJECTED"
        )
        code, _, _, _ = rpc_error(
            lambda: owner.identity.DeleteEmailIdentityPolicy(
                pb.DeleteEmailIdentityPolicyRequest(email_identity="brand.test", policy_name="user")
            )
        )
        assert code == grpc.StatusCode.NOT_FOUND

        bad_policies = [
            "not json",
            "[]",
            json.dumps({"Statement": []}),
            json.dumps(
                {"Statement": [{"Effect": "Maybe", "Principal": {"AWS": user_id}, "Action": "ses:SendEmail"}]}
            ),
            json.dumps(
                {
                    "Statement": [
                        {"Effect": "Allow", "Principal": {"AWS": "someone"}, "Action": "ses:SendEmail"}
                    ]
                }
            ),
            json.dumps(
                {"Statement": [{"Effect": "Allow", "Principal": {"AWS": user_id}, "Action": "s3:GetObject"}]}
            ),
            json.dumps(
                {
                    "Statement": [
                        {
                            "Effect": "Allow",
                            "Principal": {"AWS": user_id},
                            "Action": "ses:SendEmail",
                            "Condition": {"StringEquals": {"ses:FromAddress": "a@brand.test"}},
                        }
                    ]
                }
            ),
        ]
        for text in bad_policies:
            code, _, _, metadata = rpc_error(
                lambda text=text: owner.identity.PutEmailIdentityPolicy(
                    pb.PutEmailIdentityPolicyRequest(
                        email_identity="brand.test", policy_name="p", policy=text
                    )
                )
            )
            assert code == grpc.StatusCode.INVALID_ARGUMENT and metadata.get("field") == "policy", text
        code, _, _, metadata = rpc_error(
            lambda: owner.identity.PutEmailIdentityPolicy(
                pb.PutEmailIdentityPolicyRequest(
                    email_identity="brand.test", policy_name="bad name", policy=json.dumps(allow)
                )
            )
        )
        assert code == grpc.StatusCode.INVALID_ARGUMENT and metadata.get("field") == "policy_name"
        assert not owner.identity.GetEmailIdentityPolicies(
            pb.GetEmailIdentityPoliciesRequest(email_identity="brand.test")
        ).policies
    with idmesh.client(stranger_key) as stranger:
        code, _, _, _ = rpc_error(
            lambda: stranger.identity.PutEmailIdentityPolicy(
                pb.PutEmailIdentityPolicyRequest(
                    email_identity="brand.test", policy_name="p", policy=json.dumps(allow)
                )
            )
        )
        assert code == grpc.StatusCode.NOT_FOUND


def test_custom_mail_from_domain(idmesh: MeshThread, dns: LoopbackDns) -> None:
    account_id, key = idmesh.create_account()
    with idmesh.client(key) as client, internal(idmesh) as service:
        create_verified_domain(client, dns, "shop.test")
        for bad in ("other.test", "shop.test", "not a domain"):
            code, _, _, metadata = rpc_error(
                lambda bad=bad: client.identity.PutEmailIdentityMailFromAttributes(
                    pb.PutEmailIdentityMailFromAttributesRequest(
                        email_identity="shop.test", mail_from_domain=bad
                    )
                )
            )
            assert code == grpc.StatusCode.INVALID_ARGUMENT and metadata["field"] == "mail_from_domain", bad
        reply = client.identity.PutEmailIdentityMailFromAttributes(
            pb.PutEmailIdentityMailFromAttributesRequest(
                email_identity="shop.test",
                mail_from_domain="bounce.shop.test",
                behavior_on_mx_failure=pb.BEHAVIOR_ON_MX_FAILURE_REJECT_MESSAGE,
            )
        )
        assert reply.mail_from_attributes.mail_from_domain_status == pb.MAIL_FROM_DOMAIN_STATUS_PENDING
        assert {(r.name, r.type) for r in reply.dns_records} == {
            ("bounce.shop.test", "MX"),
            ("bounce.shop.test", "TXT"),
        }
        code, reason, _, _ = rpc_error(lambda: authorize(service, account_id, "a@shop.test"))
        assert (code, reason) == (grpc.StatusCode.FAILED_PRECONDITION, "MAIL_FROM_DOMAIN_NOT_VERIFIED")

        client.identity.PutEmailIdentityMailFromAttributes(
            pb.PutEmailIdentityMailFromAttributesRequest(
                email_identity="shop.test",
                mail_from_domain="bounce.shop.test",
                behavior_on_mx_failure=pb.BEHAVIOR_ON_MX_FAILURE_USE_DEFAULT_VALUE,
            )
        )
        assert authorize(service, account_id, "a@shop.test").mail_from_domain == ""

        publish(dns, reply.dns_records)
        checked = client.identity.CheckEmailIdentityVerification(
            pb.CheckEmailIdentityVerificationRequest(email_identity="shop.test")
        ).identity
        assert checked.mail_from_attributes.mail_from_domain_status == pb.MAIL_FROM_DOMAIN_STATUS_SUCCESS
        assert authorize(service, account_id, "a@shop.test").mail_from_domain == "bounce.shop.test"

        # The MX record disappears: the custom MAIL FROM fails; REJECT_MESSAGE then refuses to send.
        dns.remove("bounce.shop.test", "MX")
        client.identity.PutEmailIdentityMailFromAttributes(
            pb.PutEmailIdentityMailFromAttributesRequest(
                email_identity="shop.test",
                mail_from_domain="bounce.shop.test",
                behavior_on_mx_failure=pb.BEHAVIOR_ON_MX_FAILURE_REJECT_MESSAGE,
            )
        )
        checked = client.identity.CheckEmailIdentityVerification(
            pb.CheckEmailIdentityVerificationRequest(email_identity="shop.test")
        ).identity
        assert checked.mail_from_attributes.mail_from_domain_status == pb.MAIL_FROM_DOMAIN_STATUS_FAILED
        assert (
            rpc_error(lambda: authorize(service, account_id, "a@shop.test"))[1]
            == "MAIL_FROM_DOMAIN_NOT_VERIFIED"
        )

        client.identity.PutEmailIdentityMailFromAttributes(
            pb.PutEmailIdentityMailFromAttributesRequest(email_identity="shop.test", mail_from_domain="")
        )
        assert authorize(service, account_id, "a@shop.test").mail_from_domain == ""


def test_identity_storage_on_each_backend(
    start_mesh: MeshFactory, dns: LoopbackDns, database_url: str
) -> None:
    mesh = start_mesh(
        identity_database_url=database_url, dns_resolver=dns.address, dns_check_poll_seconds=3600
    )
    account_id, key = mesh.create_account()
    with mesh.client(key) as client, internal(mesh) as service:
        create_verified_domain(client, dns, "stored.test", pb.DkimSigningAttributes(include_ed25519=True))
        client.identity.PutEmailIdentityPolicy(
            pb.PutEmailIdentityPolicyRequest(
                email_identity="stored.test",
                policy_name="p",
                policy=json.dumps(
                    {
                        "Statement": {
                            "Effect": "Allow",
                            "Principal": {"AWS": account_id},
                            "Action": "ses:SendEmail",
                        }
                    }
                ),
            )
        )
        client.identity.CreateEmailIdentity(pb.CreateEmailIdentityRequest(email_identity="Person@Other.test"))
        rotated = client.identity.RotateEmailIdentityDkimKeys(
            pb.RotateEmailIdentityDkimKeysRequest(email_identity="stored.test")
        )
        publish(dns, rotated.dns_records)
        client.identity.CheckEmailIdentityVerification(
            pb.CheckEmailIdentityVerificationRequest(email_identity="stored.test")
        )
        keys = service.identity.GetSigningConfig(
            pb.GetSigningConfigRequest(account_id=account_id, domain="stored.test")
        ).keys
        assert {k.selector for k in keys} == {
            k.selector for k in rotated.dkim_attributes.keys if k.state == "NEXT"
        }
        listed = client.identity.ListEmailIdentities(pb.ListEmailIdentitiesRequest()).email_identities
        assert [(i.identity_name, i.sending_enabled) for i in listed] == [
            ("Person@other.test", False),
            ("stored.test", True),
        ]
        client.identity.DeleteEmailIdentity(pb.DeleteEmailIdentityRequest(email_identity="stored.test"))
        assert not service.identity.GetSigningConfig(
            pb.GetSigningConfigRequest(account_id=account_id, domain="stored.test")
        ).keys
