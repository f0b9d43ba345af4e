"""Email address identities: the verification message delivered through the mesh's own delivery
workers into a real SMTP server, its link served by identity over HTTP, the CLI, single use, expiry
and the resend limit."""

from __future__ import annotations

import asyncio
import email
import re
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from email import policy
from urllib.parse import parse_qs, urlsplit

import dkim
import grpc
import pytest

from postmesh.cli.main import main
from postmesh.identity.v1 import identity_pb2 as pb
from postmesh.testing_mail import LoopbackDns, SmtpServer
from tests.conftest import MeshFactory
from tests.delivery_helpers import forget_delivery_consumer
from tests.dkim_verifiers import dkimpy_dns
from tests.identity_helpers import FakeClock, authorize, internal, mail_to, rpc_error


def _link_in(mime: bytes) -> str:
    message = email.message_from_bytes(mime, policy=policy.default)
    body = message.get_body(("plain",)).get_content()  # type: ignore[union-attr]
    match = re.search(r"http://\S+/confirm\?token=\S+", body)
    assert match, body
    return match.group(0)


def _http(url: str, method: str = "GET") -> tuple[int, str]:
    request = urllib.request.Request(url, method=method)
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


@pytest.fixture
def sink(nats_url: str) -> Iterator[SmtpServer]:
    with SmtpServer() as server:
        yield server
    # Set up before the mesh, so this runs after it stopped: the work queue is free for later tests.
    asyncio.run(forget_delivery_consumer(nats_url))


def _via(sink: SmtpServer) -> dict[str, object]:
    # Every message leaves through the delivery workers, relayed to the SMTP server on loopback.
    return {
        "delivery_workers": 2,
        "delivery_mode": "smarthost",
        "smarthost": f"127.0.0.1:{sink.port}",
        "smarthost_tls": "none",
    }


def test_verification_message_link_confirms_the_address_once(
    start_mesh: MeshFactory, sink: SmtpServer
) -> None:
    mesh = start_mesh(verification_mail_from="verify@system.test", **_via(sink))
    account_id, key = mesh.create_account()
    address = f"ann.{uuid.uuid4().hex[:8]}@home.test"
    with mesh.client(key) as client, internal(mesh) as service:
        client.identity.CreateEmailIdentity(pb.CreateEmailIdentityRequest(email_identity=address))
        delivered = mail_to(sink, address)
        assert delivered.recipients == [address]
        message = email.message_from_bytes(delivered.data, policy=policy.default)
        assert message["To"] == address and message["From"] == "verify@system.test"
        assert message["Subject"] == "postmesh Email Address Verification Request"
        assert message["Message-ID"] and message["Date"]
        link = _link_in(delivered.data)
        assert rpc_error(lambda: authorize(service, account_id, address))[1] == "MESSAGE_REJECTED"

        # A link scanner's HEAD does not spend the token; unknown paths and methods are refused.
        base = link.split("/confirm")[0]
        assert _http(link, "HEAD")[0] == 200
        assert _http(f"{base}/other")[0] == 404
        assert _http(link, "POST")[0] == 405
        assert _http(f"{base}/confirm")[0] == 400
        assert (
            client.identity.GetEmailIdentity(
                pb.GetEmailIdentityRequest(email_identity=address)
            ).verification_status
            == pb.VERIFICATION_STATUS_PENDING
        )

        status, page = _http(link)
        assert status == 200 and "is verified" in page
        got = client.identity.GetEmailIdentity(pb.GetEmailIdentityRequest(email_identity=address))
        assert got.verification_status == pb.VERIFICATION_STATUS_SUCCESS and got.verified_for_sending_status
        reply = authorize(service, account_id, address)
        assert (reply.identity, reply.identity_owner_account_id) == (address, account_id)
        # Only that address: its domain is not verified.
        assert rpc_error(lambda: authorize(service, account_id, "other@home.test"))[1] == "MESSAGE_REJECTED"

        # Single use, over HTTP and over gRPC.
        status, page = _http(link)
        assert status == 410 and "already been used" in page
        token = parse_qs(urlsplit(link).query)["token"][0]
        with mesh.client() as anonymous:
            code, reason, _, _ = rpc_error(
                lambda: anonymous.identity.ConfirmEmailIdentity(pb.ConfirmEmailIdentityRequest(token=token))
            )
            assert (code, reason) == (grpc.StatusCode.FAILED_PRECONDITION, "TOKEN_ALREADY_USED")
            code, reason, _, metadata = rpc_error(
                lambda: anonymous.identity.ConfirmEmailIdentity(
                    pb.ConfirmEmailIdentityRequest(token="made-up")
                )
            )
            assert (code, reason, metadata.get("field")) == (
                grpc.StatusCode.INVALID_ARGUMENT,
                "INVALID_TOKEN",
                "token",
            )
        code, reason, _, _ = rpc_error(
            lambda: client.identity.ResendVerificationEmail(
                pb.ResendVerificationEmailRequest(email_identity=address)
            )
        )
        assert (code, reason) == (grpc.StatusCode.FAILED_PRECONDITION, "ALREADY_VERIFIED")


def test_expired_token_resend_limit_and_cli_confirm(
    start_mesh: MeshFactory, sink: SmtpServer, capsys: pytest.CaptureFixture[str]
) -> None:
    clock = FakeClock()
    mesh = start_mesh(clock=clock, verification_resend_seconds=600, **_via(sink))
    _, key = mesh.create_account()
    address = f"bob.{uuid.uuid4().hex[:8]}@work.test"
    with mesh.client(key) as client:
        client.identity.CreateEmailIdentity(pb.CreateEmailIdentityRequest(email_identity=address))
        first = parse_qs(urlsplit(_link_in(mail_to(sink, address).data)).query)["token"][0]
        code, reason, _, _ = rpc_error(
            lambda: client.identity.ResendVerificationEmail(
                pb.ResendVerificationEmailRequest(email_identity=address)
            )
        )
        assert (code, reason) == (grpc.StatusCode.RESOURCE_EXHAUSTED, "TOO_MANY_REQUESTS")

        clock.advance(hours=25)
        got = client.identity.GetEmailIdentity(pb.GetEmailIdentityRequest(email_identity=address))
        assert got.verification_status == pb.VERIFICATION_STATUS_FAILED  # the link expired
        with mesh.client() as anonymous:
            code, reason, _, _ = rpc_error(
                lambda: anonymous.identity.ConfirmEmailIdentity(pb.ConfirmEmailIdentityRequest(token=first))
            )
        assert (code, reason) == (grpc.StatusCode.FAILED_PRECONDITION, "TOKEN_EXPIRED")

        resent = client.identity.ResendVerificationEmail(
            pb.ResendVerificationEmailRequest(email_identity=address)
        )
        assert resent.expire_time.ToDatetime().timestamp() > clock.now().timestamp()
        second = parse_qs(urlsplit(_link_in(mail_to(sink, address, after=1).data)).query)["token"][0]
        assert second != first
        assert (
            client.identity.GetEmailIdentity(
                pb.GetEmailIdentityRequest(email_identity=address)
            ).verification_status
            == pb.VERIFICATION_STATUS_PENDING
        )
    capsys.readouterr()
    assert main(["identity", "confirm", second, "--endpoint", mesh.address]) == 0
    assert f"verified {address}" in capsys.readouterr().out
    assert main(["identity", "confirm", second, "--endpoint", mesh.address]) == 1
    assert "TOKEN_ALREADY_USED" in capsys.readouterr().err
    with mesh.client(key) as client:
        assert client.identity.GetEmailIdentity(
            pb.GetEmailIdentityRequest(email_identity=address)
        ).verified_for_sending_status


def test_verification_mail_is_dkim_signed_once_the_system_domain_is_published(
    start_mesh: MeshFactory, sink: SmtpServer
) -> None:
    with LoopbackDns() as zone:
        mesh = start_mesh(
            verification_mail_from="verify@system.test",
            dns_resolver=zone.address,
            dns_check_poll_seconds=0.1,
            dns_check_initial_seconds=0.1,
            dns_check_max_seconds=0.5,
            **_via(sink),
        )
        with mesh.admin() as admin:
            system = admin.identity.GetSystemEmailIdentity(pb.GetSystemEmailIdentityRequest())
            assert (system.system_address, system.identity.email_identity) == (
                "verify@system.test",
                "system.test",
            )
            for record in system.identity.dns_records:
                zone.publish(record.name, record.type, record.value)
            deadline = time.monotonic() + 60
            while not admin.identity.GetSystemEmailIdentity(
                pb.GetSystemEmailIdentityRequest()
            ).identity.verified_for_sending_status:
                assert time.monotonic() < deadline, "the system domain did not verify"
                time.sleep(0.1)
        _, key = mesh.create_account()
        address = f"signed.{uuid.uuid4().hex[:8]}@home.test"
        with mesh.client(key) as client:
            client.identity.CreateEmailIdentity(pb.CreateEmailIdentityRequest(email_identity=address))
        delivered = mail_to(sink, address)
        assert (
            delivered.data.lower().startswith(b"dkim-signature:")
            or b"\ndkim-signature:" in delivered.data.lower()
        )
        assert dkim.verify(delivered.data, dnsfunc=dkimpy_dns(zone))
