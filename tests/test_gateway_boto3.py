"""The SES-compatible HTTP API with the real boto3: sesv2 and ses clients against the gateway on
loopback, mail delivered DKIM-signed to an SMTP server found through the loopback DNS."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
import urllib.request
from email import message_from_bytes
from email import policy as email_policy
from pathlib import Path

import boto3
import dkim
import grpc
import pytest
from botocore.exceptions import ClientError

from postmesh.client import Client
from postmesh.common.natsserver import free_port
from postmesh.identity.v1 import identity_pb2 as ib
from postmesh.quota.v1 import quota_pb2 as qb
from postmesh.testing import LOOPBACK_PROCESS_ENV, MeshThread
from postmesh.testing_mail import LoopbackDns, SmtpServer
from tests.conftest import MeshFactory
from tests.dkim_verifiers import dkimpy_dns
from tests.gateway_helpers import (
    access_key,
    boto,
    error_code,
    nats_url,
    running_gateway,
    verify_domain,
    wait_for,
    zone,
)
from tests.identity_helpers import FakeClock, mail_to

__all__ = ["nats_url", "zone"]  # fixtures


def _settings(zone: LoopbackDns, **extra: object) -> dict[str, object]:
    return {
        "sandbox_max_send_rate": 1000.0,
        "dns_resolver": zone.address,
        "dns_check_poll_seconds": 3600,
        "dns_timeout_seconds": 2,
        "message_id_domain": "mail.postmesh.test",
        **extra,
    }


def test_boto3_verifies_a_domain_and_sends_simple_raw_and_templated_mail(
    start_mesh: MeshFactory, zone: LoopbackDns, nats_url: str
) -> None:
    port = free_port("127.0.0.2")
    with SmtpServer("127.0.0.2", port) as smtp:
        zone.add_mx("example.test", "mx.example.test", 10)
        zone.add_a("mx.example.test", "127.0.0.2")
        mesh = start_mesh(
            **_settings(
                zone,
                delivery_mode="mx",
                delivery_workers=2,
                smtp_port=port,
                smtp_helo_name="out.postmesh.test",
                default_bounce_domain="bounces.postmesh.test",
            )
        )
        _, api_key = mesh.create_account()
        key = access_key(mesh, api_key)
        with running_gateway(mesh) as gateway:
            v2 = boto("sesv2", gateway, key)
            v1 = boto("ses", gateway, key, region="us-west-2")

            created = v2.create_email_identity(EmailIdentity="example.test")
            assert created["IdentityType"] == "DOMAIN"
            assert created["VerifiedForSendingStatus"] is False
            assert created["DkimAttributes"]["Tokens"]
            token = v1.verify_domain_identity(Domain="example.test")["VerificationToken"]
            assert token
            verify_domain(mesh, api_key, zone, "example.test")
            identity = v2.get_email_identity(EmailIdentity="example.test")
            assert identity["VerificationStatus"] == "SUCCESS"
            assert identity["VerifiedForSendingStatus"] is True
            assert identity["DkimAttributes"]["Status"] == "SUCCESS"
            attributes = v1.get_identity_verification_attributes(Identities=["example.test", "none.test"])
            assert attributes["VerificationAttributes"] == {
                "example.test": {"VerificationStatus": "Success", "VerificationToken": token}
            }
            assert v1.list_identities(IdentityType="Domain")["Identities"] == ["example.test"]
            listed = v2.list_email_identities()["EmailIdentities"]
            assert [(i["IdentityName"], i["SendingEnabled"]) for i in listed] == [("example.test", True)]

            ids = [
                v2.send_email(
                    FromEmailAddress="News <news@example.test>",
                    Destination={"ToAddresses": ["a@example.test"]},
                    Content={
                        "Simple": {
                            "Subject": {"Data": "Hello from sesv2"},
                            "Body": {"Text": {"Data": "plain"}, "Html": {"Data": "<p>html</p>"}},
                        }
                    },
                    EmailTags=[{"Name": "campaign", "Value": "boto3"}],
                )["MessageId"]
            ]
            raw = b"From: news@example.test\r\nTo: b@example.test\r\nSubject: raw v2\r\n\r\nraw body\r\n"
            ids.append(v2.send_email(Content={"Raw": {"Data": raw}})["MessageId"])
            v2.create_email_template(
                TemplateName="welcome",
                TemplateContent={"Subject": "Hi {{name}}", "Text": "Welcome, {{name}}!"},
            )
            assert (
                v2.get_email_template(TemplateName="welcome")["TemplateContent"]["Subject"] == "Hi {{name}}"
            )
            assert [t["TemplateName"] for t in v2.list_email_templates()["TemplatesMetadata"]] == ["welcome"]
            ids.append(
                v2.send_email(
                    FromEmailAddress="news@example.test",
                    Destination={"ToAddresses": ["c@example.test"]},
                    Content={"Template": {"TemplateName": "welcome", "TemplateData": '{"name": "Ada"}'}},
                )["MessageId"]
            )
            ids.append(
                v1.send_email(
                    Source="news@example.test",
                    Destination={"ToAddresses": ["d@example.test"], "CcAddresses": ["e@example.test"]},
                    Message={"Subject": {"Data": "Hello from ses"}, "Body": {"Text": {"Data": "v1 body"}}},
                )["MessageId"]
            )
            raw_v1 = (
                b"From: news@example.test\r\nTo: f@example.test\r\nSubject: raw v1\r\n\r\nraw v1 body\r\n"
            )
            ids.append(v1.send_raw_email(RawMessage={"Data": raw_v1})["MessageId"])
            ids.append(
                v1.send_templated_email(
                    Source="news@example.test",
                    Destination={"ToAddresses": ["g@example.test"]},
                    Template="welcome",
                    TemplateData='{"name": "Grace"}',
                )["MessageId"]
            )

            received = wait_for(lambda: len(smtp.received) >= len(ids) and smtp.received)
            assert sorted(r.message_id for r in received) == sorted(f"<{i}@mail.postmesh.test>" for i in ids)
            lookup = dkimpy_dns(zone)
            subjects = set()
            for message in received:
                assert dkim.verify(message.data, dnsfunc=lookup), message.data[:400]
                subjects.add(message.message["Subject"])
            assert subjects == {
                "Hello from sesv2",
                "raw v2",
                "Hi Ada",
                "Hello from ses",
                "raw v1",
                "Hi Grace",
            }
            by_recipient = {r: m for m in received for r in m.recipients}
            assert "e@example.test" in by_recipient  # v1 Cc

            quota = wait_for(lambda: (q := v1.get_send_quota())["SentLast24Hours"] == 7 and q, within=15)
            assert quota and quota["Max24HourSend"] > 0 and quota["MaxSendRate"] == 1000.0
            account = v2.get_account()
            assert account["SendQuota"]["SentLast24Hours"] == 7  # the v1 Cc is a second recipient
            assert account["SendingEnabled"] is True and account["EnforcementStatus"] == "HEALTHY"
            points = wait_for(
                lambda: sum(p["DeliveryAttempts"] for p in v1.get_send_statistics()["SendDataPoints"]) >= 7
            )
            assert points

            v2.delete_email_template(TemplateName="welcome")
            v1.delete_identity(Identity="example.test")
            v1.delete_identity(Identity="example.test")  # SES: deleting what is gone succeeds
            assert v2.list_email_identities()["EmailIdentities"] == []


@pytest.fixture
def gateway_mesh(start_mesh: MeshFactory, zone: LoopbackDns, nats_url: str) -> MeshThread:
    return start_mesh(**_settings(zone))


def test_boto3_raises_its_own_exceptions(gateway_mesh: MeshThread, zone: LoopbackDns) -> None:
    mesh = gateway_mesh
    _, api_key = mesh.create_account()
    _, other_api_key = mesh.create_account("other")
    key = access_key(mesh, api_key)
    other_key = access_key(mesh, other_api_key)
    with running_gateway(mesh) as gateway:
        v2, v1 = boto("sesv2", gateway, key), boto("ses", gateway, key)
        v2.create_email_identity(EmailIdentity="example.test")
        with pytest.raises(v2.exceptions.AlreadyExistsException):
            v2.create_email_identity(EmailIdentity="example.test")
        with pytest.raises(v2.exceptions.NotFoundException):
            v2.get_email_identity(EmailIdentity="missing.test")
        # Another account's identity is not found, exactly like a missing one.
        with pytest.raises(v2.exceptions.NotFoundException):
            boto("sesv2", gateway, other_key).get_email_identity(EmailIdentity="example.test")
        with pytest.raises(v2.exceptions.BadRequestException):
            v2.create_email_identity(EmailIdentity="not an identity")
        with pytest.raises(v2.exceptions.BadRequestException, match="Tags"):
            v2.create_email_identity(EmailIdentity="tagged.test", Tags=[{"Key": "team", "Value": "a"}])
        simple = {"Simple": {"Subject": {"Data": "s"}, "Body": {"Text": {"Data": "b"}}}}
        with pytest.raises(v2.exceptions.MessageRejected):
            v2.send_email(
                FromEmailAddress="news@example.test",
                Destination={"ToAddresses": ["a@x.test"]},
                Content=simple,
            )
        with pytest.raises(v1.exceptions.MessageRejected):
            v1.send_email(
                Source="news@unverified.test",
                Destination={"ToAddresses": ["a@x.test"]},
                Message={"Subject": {"Data": "s"}, "Body": {"Text": {"Data": "b"}}},
            )
        verify_domain(mesh, api_key, zone, "example.test")
        with pytest.raises(v1.exceptions.TemplateDoesNotExistException):
            v1.send_templated_email(
                Source="news@example.test",
                Destination={"ToAddresses": ["a@example.test"]},
                Template="nope",
                TemplateData="{}",
            )
        with pytest.raises(v2.exceptions.NotFoundException):
            v2.get_email_template(TemplateName="nope")
        v2.create_email_template(TemplateName="t", TemplateContent={"Subject": "s", "Text": "t"})
        with pytest.raises(v2.exceptions.AlreadyExistsException):
            v2.create_email_template(TemplateName="t", TemplateContent={"Subject": "s", "Text": "t"})

        v2.put_suppressed_destination(EmailAddress="gone@example.test", Reason="BOUNCE")
        found = v2.get_suppressed_destination(EmailAddress="gone@example.test")["SuppressedDestination"]
        assert (found["EmailAddress"], found["Reason"]) == ("gone@example.test", "BOUNCE")
        listed = v2.list_suppressed_destinations(Reasons=["BOUNCE"])["SuppressedDestinationSummaries"]
        assert [s["EmailAddress"] for s in listed] == ["gone@example.test"]
        v2.delete_suppressed_destination(EmailAddress="gone@example.test")
        with pytest.raises(v2.exceptions.NotFoundException):
            v2.get_suppressed_destination(EmailAddress="gone@example.test")
        with pytest.raises(v2.exceptions.BadRequestException):
            v2.put_suppressed_destination(EmailAddress="gone@example.test", Reason="BORED")

        # Authentication: a wrong secret, an unknown key, a revoked key.
        wrong = (key[0], "A" * 64)
        assert error_code(lambda: boto("sesv2", gateway, wrong).get_account()) == (
            "InvalidSignatureException",
            403,
        )
        assert error_code(lambda: boto("ses", gateway, wrong).get_send_quota()) == (
            "SignatureDoesNotMatch",
            403,
        )
        unknown = ("AKPMAAAAAAAAAAAAAAAA", key[1])
        assert error_code(lambda: boto("sesv2", gateway, unknown).get_account()) == (
            "UnrecognizedClientException",
            403,
        )
        assert error_code(lambda: boto("ses", gateway, unknown).get_send_quota()) == (
            "InvalidClientTokenId",
            403,
        )
        with mesh.client(api_key) as client:
            client.identity.RevokeAccessKey(ib.RevokeAccessKeyRequest(access_key_id=key[0]))
        # At once: the gateway keeps no cache of keys.
        assert error_code(lambda: v2.get_account()) == ("UnrecognizedClientException", 403)
        assert error_code(lambda: v1.get_send_quota()) == ("InvalidClientTokenId", 403)


def test_signatures_outside_the_clock_skew_window_are_refused(gateway_mesh: MeshThread) -> None:
    _, api_key = gateway_mesh.create_account()
    key = access_key(gateway_mesh, api_key)
    clock = FakeClock()
    with running_gateway(gateway_mesh, clock=clock) as gateway:
        v2, v1 = boto("sesv2", gateway, key), boto("ses", gateway, key)
        assert v2.get_account()["SendingEnabled"] is True
        clock.advance(minutes=16)
        with pytest.raises(ClientError, match="Signature expired"):
            v2.get_account()
        assert error_code(lambda: v1.get_send_quota()) == ("SignatureDoesNotMatch", 403)
        clock.advance(minutes=-32)
        with pytest.raises(ClientError, match="not yet current"):
            v2.get_account()


def test_postmesh_serve_all_runs_the_gateway(nats_url: str, tmp_path: Path) -> None:
    port, http_port = free_port(), free_port()
    env = {
        **os.environ,
        **LOOPBACK_PROCESS_ENV,
        "GRPC_LISTEN": f"127.0.0.1:{port}",
        "HTTP_API_LISTEN": f"127.0.0.1:{http_port}",
        "METRICS_PORT": "0",
        "DATA_DIR": str(tmp_path / "var"),
        "NATS_URL": nats_url,
        "ADMIN_API_KEY": "admin-secret",
        "LOG_LEVEL": "WARNING",
        "DKIM_MASTER_KEYS": "test:" + "A" * 43,
        "IDENTITY_HTTP_LISTEN": "127.0.0.1:0",
        "DNS_RESOLVER": "127.0.0.1:9",
        "DELIVERY_WORKERS": "0",
    }
    process = subprocess.Popen(
        [sys.executable, "-m", "postmesh.cli.main", "serve", "all"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 60
        with Client(f"127.0.0.1:{port}", "admin-secret") as admin:
            while True:
                try:
                    if admin.health_status("", timeout=2) == "SERVING":
                        break
                except grpc.RpcError:
                    pass
                assert time.monotonic() < deadline, "postmesh serve all did not become SERVING"
                time.sleep(0.2)
            api_key = admin.identity.CreateAccount(ib.CreateAccountRequest(name="http")).api_key_secret
        with Client(f"127.0.0.1:{port}", api_key) as client:
            created = client.identity.CreateAccessKey(ib.CreateAccessKeyRequest())
        v2 = boto3.client(
            "sesv2",
            endpoint_url=f"http://127.0.0.1:{http_port}",
            region_name="ap-southeast-2",
            aws_access_key_id=created.access_key.access_key_id,
            aws_secret_access_key=created.secret_access_key,
        )
        assert v2.get_account()["SendQuota"]["SentLast24Hours"] == 0
    finally:
        process.terminate()
        output = process.communicate(timeout=60)[0].decode()
    assert f"SES-compatible HTTP API on http://127.0.0.1:{http_port}" in output
    assert process.returncode == 0, output


def test_boto3_identity_settings_templates_and_bulk_sending(
    gateway_mesh: MeshThread, zone: LoopbackDns
) -> None:
    mesh = gateway_mesh
    _, api_key = mesh.create_account()
    key = access_key(mesh, api_key)
    with running_gateway(mesh) as gateway:
        v2 = boto("sesv2", gateway, key)
        v2.create_email_identity(EmailIdentity="example.test")
        verify_domain(mesh, api_key, zone, "example.test")
        v2.put_email_identity_dkim_attributes(EmailIdentity="example.test", SigningEnabled=False)
        v2.put_email_identity_mail_from_attributes(
            EmailIdentity="example.test",
            MailFromDomain="bounce.example.test",
            BehaviorOnMxFailure="REJECT_MESSAGE",
        )
        identity = v2.get_email_identity(EmailIdentity="example.test")
        assert identity["DkimAttributes"]["SigningEnabled"] is False
        assert identity["MailFromAttributes"]["MailFromDomain"] == "bounce.example.test"
        assert identity["MailFromAttributes"]["BehaviorOnMxFailure"] == "REJECT_MESSAGE"
        with pytest.raises(v2.exceptions.BadRequestException):
            v2.put_email_identity_mail_from_attributes(
                EmailIdentity="example.test", MailFromDomain="bounce.elsewhere.test"
            )
        v2.put_email_identity_mail_from_attributes(EmailIdentity="example.test")  # removes it
        assert (
            v2.get_email_identity(EmailIdentity="example.test")["MailFromAttributes"]["MailFromDomain"] == ""
        )

        v2.create_email_template(TemplateName="news", TemplateContent={"Subject": "Old {{n}}", "Text": "t"})
        v2.update_email_template(
            TemplateName="news", TemplateContent={"Subject": "Issue {{n}}", "Text": "#{{n}}"}
        )
        rendered = v2.test_render_email_template(TemplateName="news", TemplateData='{"n": 7}')[
            "RenderedTemplate"
        ]
        assert "Subject: Issue 7" in rendered
        with pytest.raises(v2.exceptions.NotFoundException):
            v2.test_render_email_template(TemplateName="missing", TemplateData="{}")

        results = v2.send_bulk_email(
            FromEmailAddress="news@example.test",
            DefaultContent={"Template": {"TemplateName": "news", "TemplateData": '{"n": 1}'}},
            BulkEmailEntries=[
                {"Destination": {"ToAddresses": ["a@example.test"]}},
                {
                    "Destination": {"ToAddresses": ["b@example.test"]},
                    "ReplacementEmailContent": {
                        "ReplacementTemplate": {"ReplacementTemplateData": '{"n": 2}'}
                    },
                },
                {"Destination": {"ToAddresses": ["outside@elsewhere.test"]}},  # sandbox: not verified
            ],
        )["BulkEmailEntryResults"]
        assert [r["Status"] for r in results] == ["SUCCESS", "SUCCESS", "MESSAGE_REJECTED"]
        assert results[0]["MessageId"] and results[1]["MessageId"] and results[2]["Error"]
        with pytest.raises(v2.exceptions.BadRequestException):
            v2.send_email(
                FromEmailAddress="news@example.test",
                Destination={"ToAddresses": ["a@example.test"]},
                Content={"Template": {"TemplateContent": {"Subject": "inline"}, "TemplateData": "{}"}},
            )


def test_boto3_templates_bulk_and_identity_attributes_in_v1_and_policies_and_account_details_in_v2(
    gateway_mesh: MeshThread, zone: LoopbackDns
) -> None:
    mesh = gateway_mesh
    account_id, api_key = mesh.create_account()
    key = access_key(mesh, api_key)
    with running_gateway(mesh) as gateway:
        v2, v1 = boto("sesv2", gateway, key), boto("ses", gateway, key)
        v1.verify_domain_identity(Domain="example.test")
        tokens = v1.verify_domain_dkim(Domain="example.test")["DkimTokens"]
        assert tokens
        verify_domain(mesh, api_key, zone, "example.test")
        dkim_attributes = v1.get_identity_dkim_attributes(Identities=["example.test", "nothing.test"])
        assert dkim_attributes["DkimAttributes"] == {
            "example.test": {"DkimEnabled": True, "DkimVerificationStatus": "Success", "DkimTokens": tokens}
        }
        v1.set_identity_dkim_enabled(Identity="example.test", DkimEnabled=False)
        assert not v1.get_identity_dkim_attributes(Identities=["example.test"])["DkimAttributes"][
            "example.test"
        ]["DkimEnabled"]
        v1.set_identity_mail_from_domain(
            Identity="example.test", MailFromDomain="mail.example.test", BehaviorOnMXFailure="RejectMessage"
        )
        mail_from = v1.get_identity_mail_from_domain_attributes(Identities=["example.test"])
        attributes = mail_from["MailFromDomainAttributes"]["example.test"]
        assert attributes["MailFromDomain"] == "mail.example.test"
        assert attributes["BehaviorOnMXFailure"] == "RejectMessage"
        assert attributes["MailFromDomainStatus"] in ("Pending", "Success", "Failed", "TemporaryFailure")
        v1.set_identity_mail_from_domain(Identity="example.test")

        v1.create_template(
            Template={"TemplateName": "t1", "SubjectPart": "Hi {{who}}", "TextPart": "Body {{who}}"}
        )
        with pytest.raises(v1.exceptions.AlreadyExistsException):
            v1.create_template(Template={"TemplateName": "t1", "SubjectPart": "again", "TextPart": "x"})
        v1.update_template(Template={"TemplateName": "t1", "SubjectPart": "Hello {{who}}", "TextPart": "B"})
        assert v1.get_template(TemplateName="t1")["Template"] == {
            "TemplateName": "t1",
            "SubjectPart": "Hello {{who}}",
            "TextPart": "B",
        }
        assert [t["Name"] for t in v1.list_templates()["TemplatesMetadata"]] == ["t1"]
        assert (
            "Subject: Hello Ada"
            in v1.test_render_template(TemplateName="t1", TemplateData='{"who": "Ada"}')["RenderedTemplate"]
        )
        with pytest.raises(v1.exceptions.TemplateDoesNotExistException):
            v1.get_template(TemplateName="nope")
        statuses = v1.send_bulk_templated_email(
            Source="news@example.test",
            Template="t1",
            DefaultTemplateData='{"who": "all"}',
            Destinations=[
                {"Destination": {"ToAddresses": ["a@example.test"]}},
                {
                    "Destination": {"ToAddresses": ["b@example.test"]},
                    "ReplacementTemplateData": '{"who": "B"}',
                },
                {"Destination": {"ToAddresses": ["c@elsewhere.test"]}},
            ],
        )["Status"]
        assert [s["Status"] for s in statuses] == ["Success", "Success", "MessageRejected"]
        assert statuses[0]["MessageId"] and statuses[2]["Error"]
        v1.delete_template(TemplateName="t1")
        v1.delete_template(TemplateName="t1")  # SES: deleting what is gone succeeds
        assert v1.list_templates()["TemplatesMetadata"] == []
        assert v1.get_account_sending_enabled()["Enabled"] is True

        policy = json.dumps(
            {
                "Version": "2012-10-17",
                "Statement": [
                    {
                        "Effect": "Allow",
                        "Principal": {"AWS": ["123456789012"]},
                        "Action": ["ses:SendEmail", "ses:SendRawEmail"],
                        "Resource": "*",
                    }
                ],
            }
        )
        v2.create_email_identity_policy(EmailIdentity="example.test", PolicyName="partner", Policy=policy)
        with pytest.raises(v2.exceptions.AlreadyExistsException):
            v2.create_email_identity_policy(EmailIdentity="example.test", PolicyName="partner", Policy=policy)
        with pytest.raises(v2.exceptions.NotFoundException):
            v2.update_email_identity_policy(EmailIdentity="example.test", PolicyName="other", Policy=policy)
        v2.update_email_identity_policy(EmailIdentity="example.test", PolicyName="partner", Policy=policy)
        assert set(v2.get_email_identity_policies(EmailIdentity="example.test")["Policies"]) == {"partner"}
        v2.delete_email_identity_policy(EmailIdentity="example.test", PolicyName="partner")
        assert v2.get_email_identity_policies(EmailIdentity="example.test")["Policies"] == {}

        signing = v2.put_email_identity_dkim_signing_attributes(
            EmailIdentity="example.test",
            SigningAttributesOrigin="AWS_SES",
            SigningAttributes={"NextSigningKeyLength": "RSA_1024_BIT"},
        )
        assert signing["DkimStatus"] in ("PENDING", "SUCCESS") and signing["DkimTokens"]
        with pytest.raises(v2.exceptions.BadRequestException):
            v2.put_email_identity_dkim_signing_attributes(
                EmailIdentity="example.test", SigningAttributesOrigin="SOMEONE_ELSE"
            )

        v2.put_account_details(
            MailType="TRANSACTIONAL",
            WebsiteURL="https://example.test",
            ContactLanguage="EN",
            UseCaseDescription="Receipts for orders placed on our shop.",
            AdditionalContactEmailAddresses=["ops@example.test"],
            ProductionAccessEnabled=True,
        )
        details = v2.get_account()["Details"]
        assert details["MailType"] == "TRANSACTIONAL" and details["WebsiteURL"] == "https://example.test"
        assert details["ReviewDetails"]["Status"] == "PENDING"
        assert account_id


def test_quota_refusals_are_ses_errors_and_the_aws_cli_sends(
    start_mesh: MeshFactory, zone: LoopbackDns, nats_url: str, tmp_path: Path
) -> None:
    mesh = start_mesh(**_settings(zone, sandbox_max_24_hour_send=1.0))
    account_id, api_key = mesh.create_account()
    key = access_key(mesh, api_key)
    with running_gateway(mesh) as gateway:
        v2, v1 = boto("sesv2", gateway, key), boto("ses", gateway, key)
        v2.create_email_identity(EmailIdentity="example.test")
        verify_domain(mesh, api_key, zone, "example.test")
        simple = {"Simple": {"Subject": {"Data": "s"}, "Body": {"Text": {"Data": "b"}}}}
        message = {"Subject": {"Data": "s"}, "Body": {"Text": {"Data": "b"}}}
        with mesh.admin() as admin:
            admin.quota.PauseAccountSending(
                qb.PauseAccountSendingRequest(account_id=account_id, reason="test")
            )
        with pytest.raises(v2.exceptions.SendingPausedException):
            v2.send_email(
                FromEmailAddress="news@example.test",
                Destination={"ToAddresses": ["b@example.test"]},
                Content=simple,
            )
        with pytest.raises(v1.exceptions.AccountSendingPausedException):
            v1.send_email(
                Source="news@example.test", Destination={"ToAddresses": ["b@example.test"]}, Message=message
            )
        assert v1.get_account_sending_enabled()["Enabled"] is False
        with mesh.admin() as admin:
            admin.quota.ReinstateAccountSending(
                qb.ReinstateAccountSendingRequest(account_id=account_id, reason="test over")
            )
        assert v1.get_account_sending_enabled()["Enabled"] is True
        aws = shutil.which("aws")
        if aws:  # the README's command, with the AWS CLI's own botocore
            env = {
                **os.environ,
                **LOOPBACK_PROCESS_ENV,
                "AWS_ACCESS_KEY_ID": key[0],
                "AWS_SECRET_ACCESS_KEY": key[1],
                "AWS_CONFIG_FILE": str(tmp_path / "none"),
                "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "none"),
            }
            result = subprocess.run(
                [
                    aws, "sesv2", "send-email", "--endpoint-url", gateway.url, "--region", "eu-west-1",
                    "--from-email-address", "news@example.test",
                    "--destination", "ToAddresses=ada@example.test",
                    "--content", "Simple={Subject={Data=Hello},Body={Text={Data=Hi Ada}}}",
                ],
                env=env, capture_output=True, text=True, timeout=120,
            )  # fmt: skip
            assert result.returncode == 0, result.stderr
            assert json.loads(result.stdout)["MessageId"]
        else:
            v2.send_email(
                FromEmailAddress="news@example.test",
                Destination={"ToAddresses": ["ada@example.test"]},
                Content={"Simple": {"Subject": {"Data": "Hello"}, "Body": {"Text": {"Data": "Hi Ada"}}}},
            )
        with pytest.raises(v2.exceptions.LimitExceededException):
            v2.send_email(
                FromEmailAddress="news@example.test",
                Destination={"ToAddresses": ["b@example.test"]},
                Content=simple,
            )
        assert error_code(
            lambda: v1.send_email(
                Source="news@example.test", Destination={"ToAddresses": ["b@example.test"]}, Message=message
            )
        ) == ("Throttling", 400)


def test_boto3_v1_verifies_an_address_by_its_link_and_manages_policies(
    start_mesh: MeshFactory, nats_url: str
) -> None:
    with SmtpServer() as sink:
        mesh = start_mesh(
            verification_mail_from="verify@system.test",
            delivery_workers=1,
            delivery_mode="smarthost",
            smarthost=f"127.0.0.1:{sink.port}",
            smarthost_tls="none",
        )
        _, api_key = mesh.create_account()
        key = access_key(mesh, api_key)
        with running_gateway(mesh) as gateway:
            v1 = boto("ses", gateway, key)
            v1.verify_email_identity(EmailAddress="ann@home.test")
            v1.verify_email_identity(EmailAddress="ann@home.test")  # SES: asking again is no error
            attributes = v1.get_identity_verification_attributes(Identities=["ann@home.test"])
            assert attributes["VerificationAttributes"]["ann@home.test"] == {"VerificationStatus": "Pending"}
            assert v1.list_verified_email_addresses()["VerifiedEmailAddresses"] == []

            delivered = mail_to(sink, "ann@home.test")
            parsed = message_from_bytes(delivered.data, policy=email_policy.default)
            text = parsed.get_body(("plain",)).get_content()  # type: ignore[union-attr]
            link = re.search(r"http://\S+/confirm\?token=\S+", text)
            assert link, text
            with urllib.request.urlopen(link.group(0), timeout=30) as page:
                assert page.status == 200
            attributes = v1.get_identity_verification_attributes(Identities=["ann@home.test"])
            assert attributes["VerificationAttributes"]["ann@home.test"] == {"VerificationStatus": "Success"}
            assert v1.list_verified_email_addresses()["VerifiedEmailAddresses"] == ["ann@home.test"]
            assert v1.list_identities(IdentityType="EmailAddress")["Identities"] == ["ann@home.test"]

            policy = json.dumps(
                {
                    "Version": "2012-10-17",
                    "Statement": [
                        {
                            "Effect": "Allow",
                            "Principal": {"AWS": ["123456789012"]},
                            "Action": ["ses:SendEmail"],
                            "Resource": "*",
                        }
                    ],
                }
            )
            v1.put_identity_policy(Identity="ann@home.test", PolicyName="p1", Policy=policy)
            assert v1.list_identity_policies(Identity="ann@home.test")["PolicyNames"] == ["p1"]
            got = v1.get_identity_policies(Identity="ann@home.test", PolicyNames=["p1", "p2"])["Policies"]
            assert json.loads(got["p1"]) == json.loads(policy) and "p2" not in got
            v1.delete_identity_policy(Identity="ann@home.test", PolicyName="p1")
            assert v1.list_identity_policies(Identity="ann@home.test")["PolicyNames"] == []

            v1.delete_verified_email_address(EmailAddress="ann@home.test")
            assert v1.list_verified_email_addresses()["VerifiedEmailAddresses"] == []
