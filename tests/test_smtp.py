"""The SMTP submission interface, driven by real SMTP clients (smtplib, aiosmtplib, Debian's swaks)
against a real mesh: a verified domain on a loopback DNS server, delivery through MX to a receiving
aiosmtpd on 127.0.0.2, DKIM verified there, events read off JetStream."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import shutil
import smtplib
import socket
import ssl
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiosmtplib
import dkim
import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from postmesh.common.natsserver import free_port
from postmesh.events.v1 import events_pb2 as ev
from postmesh.feedback.v1 import configuration_sets_pb2, feedback_pb2
from postmesh.identity.v1 import identity_pb2
from postmesh.identity.v1 import smtp_credentials_pb2 as smtp_pb
from postmesh.quota.v1 import quota_pb2
from postmesh.testing import MeshThread
from postmesh.testing_mail import LoopbackDns, Received, SmtpServer
from services.sender.smtp.tls import write_self_signed
from tests.dkim_verifiers import dkimpy_dns
from tests.identity_helpers import create_verified_domain
from tests.sending_helpers import email_events, of_type, own_nats_server, refusal, sent_last_24_hours

SEND = ev.EMAIL_EVENT_TYPE_SEND
DELIVERY = ev.EMAIL_EVENT_TYPE_DELIVERY
MESSAGE_ID_DOMAIN = "mail.postmesh.test"


def _client_tls() -> ssl.SSLContext:
    # The server's certificate is self-signed, as under `make run`.
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


@dataclass
class SmtpMesh:
    mesh: MeshThread
    zone: LoopbackDns
    sink: SmtpServer
    cert_dir: Path
    nats_url: str

    def unit(self, mesh: MeshThread | None = None) -> Any:
        server = (mesh or self.mesh).server
        assert server is not None
        return server.services["smtp"]

    @property
    def starttls_port(self) -> int:
        port: int = self.unit().server.starttls_ports[0]
        return port

    @property
    def tls_port(self) -> int:
        port: int = self.unit().server.tls_ports[0]
        return port

    def smtp_settings(self, **extra: Any) -> dict[str, Any]:
        return _smtp_settings(self.cert_dir, **extra)


def _smtp_settings(cert_dir: Path, **extra: Any) -> dict[str, Any]:
    """SMTP listeners on free loopback ports with the module's certificate."""
    return {
        "smtp_starttls_listen": "127.0.0.1:0",
        "smtp_tls_listen": "127.0.0.1:0",
        "smtp_tls_cert_file": str(cert_dir / "cert.pem"),
        "smtp_tls_key_file": str(cert_dir / "key.pem"),
        **extra,
    }


@pytest.fixture(scope="module")
def smtp_mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SmtpMesh]:
    """One mesh for the module: SMTP listeners, delivery through MX to a sink on 127.0.0.2."""
    base = tmp_path_factory.mktemp("smtp")
    write_self_signed(base / "cert.pem", base / "key.pem")
    port = free_port("127.0.0.2")
    with (
        own_nats_server(base / "nats") as nats_url,
        LoopbackDns() as zone,
        SmtpServer("127.0.0.2", port) as sink,
    ):
        for domain in ("example.test", "other.test"):
            zone.add_mx(domain, "mx.example.test", 10)
        zone.add_a("mx.example.test", "127.0.0.2")
        mesh = MeshThread(
            nats_url=nats_url,
            data_dir=base / "mesh",
            **_smtp_settings(
                base,
                sandbox_max_send_rate=1000.0,
                dns_resolver=zone.address,
                dns_check_poll_seconds=3600,
                dns_timeout_seconds=2,
                message_id_domain=MESSAGE_ID_DOMAIN,
                delivery_mode="mx",
                delivery_workers=2,
                smtp_port=port,
                smtp_helo_name="out.postmesh.test",
                default_bounce_domain="bounces.postmesh.test",
                # Revocation must reach the SMTP servers through the event, not by the cache lapsing.
                auth_cache_seconds=3600.0,
                smtp_tls_reload_seconds=0.2,
            ),
        )
        mesh.start()
        try:
            yield SmtpMesh(mesh, zone, sink, base, nats_url)
        finally:
            mesh.stop()


def _replica(setup: SmtpMesh, name: str, **settings: Any) -> MeshThread:
    """Another SMTP server alone in a process of its own, using the module mesh's services."""
    mesh = setup.mesh
    return MeshThread(
        nats_url=setup.nats_url,
        data_dir=setup.cert_dir / name,
        services=("smtp",),
        admin_api_key=mesh.admin_key,
        service_api_key=mesh.service_key,
        identity_endpoint=mesh.address,
        quota_endpoint=mesh.address,
        feedback_endpoint=mesh.address,
        message_id_domain=MESSAGE_ID_DOMAIN,
        **setup.smtp_settings(**settings),
    ).start()


@dataclass
class Sender:
    account_id: str
    api_key: str
    username: str
    password: str


def _new_sender(setup: SmtpMesh, domain: str = "example.test") -> Sender:
    account_id, api_key = setup.mesh.create_account()
    with setup.mesh.client(api_key) as client:
        create_verified_domain(client, setup.zone, domain)
        created = client.identity.CreateSmtpCredential(smtp_pb.CreateSmtpCredentialRequest(description="app"))
    return Sender(account_id, api_key, created.credential.username, created.password)


@pytest.fixture
def sender(smtp_mesh: SmtpMesh) -> Sender:
    return _new_sender(smtp_mesh)


def _message(
    sender: str = "news@example.test", to: str = "a@example.test", subject: str = "Hello", extra: str = ""
) -> bytes:
    return (
        f"From: News <{sender}>\r\nTo: {to}\r\nSubject: {subject}\r\n{extra}"
        "Content-Type: text/plain; charset=utf-8\r\n\r\nHello over SMTP.\r\n"
    ).encode()


def _starttls_session(setup: SmtpMesh, sender: Sender) -> smtplib.SMTP:
    smtp = smtplib.SMTP("127.0.0.1", setup.starttls_port, timeout=30)
    smtp.starttls(context=_client_tls())
    smtp.ehlo()
    smtp.user, smtp.password = sender.username, sender.password
    code, reply = smtp.auth("PLAIN", smtp.auth_plain, initial_response_ok=True)
    assert code == 235, reply
    return smtp


def _send(smtp: smtplib.SMTP, mail_from: str, recipients: list[str], data: bytes) -> tuple[int, str]:
    """MAIL, RCPT, DATA: the DATA reply (or the first refusal before it)."""
    code, reply = smtp.mail(mail_from)
    if code != 250:
        smtp.rset()
        return code, reply.decode()
    for recipient in recipients:
        code, reply = smtp.rcpt(recipient)
        if code != 250:
            smtp.rset()
            return code, reply.decode()
    code, reply = smtp.data(data)
    return code, reply.decode()


def _accepted_id(code: int, reply: str) -> str:
    assert code == 250, reply
    assert reply.startswith("Ok "), reply
    return reply.removeprefix("Ok ").strip()


def _arrived(sink: SmtpServer, message_id: str, within: float = 60.0) -> Received:
    header = f"<{message_id}@{MESSAGE_ID_DOMAIN}>"
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        for received in sink.received:
            if received.message_id == header:
                return received
        time.sleep(0.1)
    raise AssertionError(f"{message_id} did not arrive")


def _events_for(setup: SmtpMesh, account_id: str, message_id: str, *types: int) -> list[ev.Event]:
    def complete(events: list[ev.Event]) -> bool:
        seen = {e.email.event_type for e in events if e.email.mail.message_id == message_id}
        return set(types) <= seen

    events = email_events(setup.nats_url, account_id, until=complete, timeout=60)
    return [e for e in events if e.email.mail.message_id == message_id]


# --- The session: EHLO, TLS, AUTH.


def test_ehlo_offers_auth_only_once_tls_is_up(smtp_mesh: SmtpMesh, sender: Sender) -> None:
    with smtplib.SMTP("127.0.0.1", smtp_mesh.starttls_port, timeout=30) as smtp:
        smtp.ehlo("client.test")
        for extension in ("size", "8bitmime", "pipelining", "smtputf8", "starttls"):
            assert smtp.has_extn(extension), smtp.esmtp_features
        assert not smtp.has_extn("auth")
        assert smtp.docmd("AUTH", "PLAIN") == (530, b"Must issue a STARTTLS command first")
        assert smtp.docmd("MAIL", "FROM:<news@example.test>")[0] == 530
        smtp.starttls(context=_client_tls())
        smtp.ehlo("client.test")
        assert set(smtp.esmtp_features["auth"].split()) == {"LOGIN", "PLAIN"}
        assert not smtp.has_extn("starttls")
        assert smtp.docmd("MAIL", "FROM:<news@example.test>") == (530, b"Authentication required")
        smtp.user, smtp.password = sender.username, "wrong"
        with pytest.raises(smtplib.SMTPAuthenticationError) as refused:
            smtp.auth("PLAIN", smtp.auth_plain)
        assert refused.value.smtp_code == 535
        assert b"Authentication Credentials Invalid" in refused.value.smtp_error
        smtp.password = sender.password
        assert smtp.auth("LOGIN", smtp.auth_login)[0] == 235


def test_message_sent_over_starttls_arrives_dkim_signed_with_the_reply_message_id_in_its_events(
    smtp_mesh: SmtpMesh, sender: Sender
) -> None:
    with smtp_mesh.mesh.client(sender.api_key) as client:
        # A send naming a configuration set needs the set to exist (SES refuses unknown sets).
        client.feedback.CreateConfigurationSet(
            configuration_sets_pb2.CreateConfigurationSetRequest(configuration_set_name="marketing")
        )
    options = (
        "X-SES-CONFIGURATION-SET: marketing\r\n"
        "X-SES-MESSAGE-TAGS: campaign=spring, kind=news\r\n"
        "X-Postmesh-Source-Arn: example.test\r\n"
    )
    with _starttls_session(smtp_mesh, sender) as smtp:
        code, reply = _send(smtp, "news@example.test", ["a@example.test"], _message(extra=options))
    message_id = _accepted_id(code, reply)
    received = _arrived(smtp_mesh.sink, message_id)
    assert dkim.verify(received.data, dnsfunc=dkimpy_dns(smtp_mesh.zone)), received.data[:400]
    assert received.recipients == ["a@example.test"]
    assert received.mail_from.endswith("@bounces.postmesh.test")
    head = received.data.split(b"\r\n\r\n", 1)[0].lower()
    assert b"x-ses-" not in head and b"x-postmesh-" not in head
    events = _events_for(smtp_mesh, sender.account_id, message_id, SEND, DELIVERY)
    send = of_type(events, SEND)[0].email.mail
    assert send.configuration_set_name == "marketing"
    assert {(t.name, t.value) for t in send.tags} >= {("campaign", "spring"), ("kind", "news")}
    assert send.source == "news@example.test" and list(send.destination) == ["a@example.test"]
    assert of_type(events, DELIVERY)


def test_implicit_tls_with_auth_login_through_aiosmtplib(smtp_mesh: SmtpMesh, sender: Sender) -> None:
    async def send() -> str:
        client = aiosmtplib.SMTP(
            hostname="127.0.0.1", port=smtp_mesh.tls_port, use_tls=True, tls_context=_client_tls(), timeout=30
        )
        async with client:
            await client.ehlo()
            assert client.supports_extension("auth") and not client.supports_extension("starttls")
            await client.auth_login(sender.username, sender.password)
            errors, reply = await client.sendmail(
                "news@example.test", ["b@example.test"], _message(to="b@example.test")
            )
            assert errors == {}
            return reply

    message_id = _accepted_id(250, asyncio.run(send()))
    _arrived(smtp_mesh.sink, message_id)


def test_pipelined_commands_get_their_replies_in_order(smtp_mesh: SmtpMesh, sender: Sender) -> None:
    raw = socket.create_connection(("127.0.0.1", smtp_mesh.tls_port), timeout=30)
    with _client_tls().wrap_socket(raw) as conn:
        reader = conn.makefile("rb")

        def replies(count: int) -> list[str]:
            lines: list[str] = []
            while len(lines) < count:
                line = reader.readline().decode().rstrip("\r\n")
                assert line, "connection closed"
                if line[3:4] == " ":
                    lines.append(line)
            return lines

        assert replies(1)[0].startswith("220")
        plain = base64.b64encode(f"\0{sender.username}\0{sender.password}".encode()).decode()
        conn.sendall(f"EHLO client.test\r\nAUTH PLAIN {plain}\r\n".encode())
        assert [r[:3] for r in replies(2)] == ["250", "235"]
        # RFC 2920: the whole transaction in one write, replies in order.
        conn.sendall(
            b"MAIL FROM:<news@example.test>\r\n"
            b"RCPT TO:<c@example.test>\r\nRCPT TO:<d@example.test>\r\nDATA\r\n"
        )
        assert [r[:3] for r in replies(4)] == ["250", "250", "250", "354"]
        conn.sendall(_message(to="c@example.test, d@example.test") + b".\r\nQUIT\r\n")
        accepted, bye = replies(2)
    message_id = _accepted_id(int(accepted[:3]), accepted[4:])
    assert bye.startswith("221")
    received = _arrived(smtp_mesh.sink, message_id)
    assert sorted(received.recipients) in (["c@example.test", "d@example.test"], ["c@example.test"])


# --- Refusals, each with SES's code.


def test_every_refusal_has_its_code_and_leaves_nothing_queued(smtp_mesh: SmtpMesh, sender: Sender) -> None:
    with _starttls_session(smtp_mesh, sender) as smtp:
        code, reply = _send(smtp, "me@unverified.test", ["a@example.test"], _message("me@unverified.test"))
        assert code == 554 and reply.startswith("Message rejected: Email address is not verified"), reply
        # The header From must be verified too, not only the envelope sender.
        code, reply = _send(smtp, "news@example.test", ["a@example.test"], _message("x@unverified.test"))
        assert code == 554 and "x@unverified.test" in reply, reply
        # The sandbox: every recipient must be verified.
        code, reply = _send(smtp, "news@example.test", ["x@elsewhere.test"], _message(to="x@elsewhere.test"))
        assert code == 554 and "x@elsewhere.test" in reply, reply
        # At most 50 recipients: the 51st RCPT is refused.
        assert smtp.mail("news@example.test")[0] == 250
        for i in range(50):
            assert smtp.rcpt(f"r{i}@example.test")[0] == 250
        code, reply_bytes = smtp.rcpt("r50@example.test")
        assert code == 452 and b"Too many recipients" in reply_bytes
        smtp.rset()
        # Over the size limit (announced with SIZE, refused before any data is sent).
        code, reply_bytes = smtp.docmd("MAIL", "FROM:<news@example.test> SIZE=50000000")
        assert code == 552, reply_bytes
        smtp.rset()
        # Malformed MIME, header injection, refused attachment types: 554 with the reason.
        injected = (
            b"From: news@example.test\r\nTo: a@example.test\r\nSubject: hi\r\nbcc a@evil.test\r\n\r\nx\r\n"
        )
        code, reply = _send(smtp, "news@example.test", ["a@example.test"], injected)
        assert code == 554 and "Malformed header line" in reply, reply
        code, reply = _send(smtp, "news@example.test", ["a@example.test"], b"no header block at all\r\n")
        assert code == 554 and "Transaction failed" in reply, reply
        exe = _message(extra='Content-Disposition: attachment; filename="run.exe"\r\n')
        code, reply = _send(smtp, "news@example.test", ["a@example.test"], exe)
        assert code == 554 and "Illegal filename" in reply, reply
    with smtp_mesh.mesh.client(sender.api_key) as client:
        assert sent_last_24_hours(client, 0) == 0
    assert of_type(email_events(smtp_mesh.nats_url, sender.account_id, timeout=1), SEND) == []


def test_paused_and_throttled_accounts_get_554_and_454(smtp_mesh: SmtpMesh, sender: Sender) -> None:
    paused = _new_sender(smtp_mesh)
    with smtp_mesh.mesh.admin() as admin:
        admin.quota.PauseAccountSending(
            quota_pb2.PauseAccountSendingRequest(account_id=paused.account_id, reason="abuse report")
        )
        admin.quota.SetAccountQuota(
            quota_pb2.SetAccountQuotaRequest(
                account_id=sender.account_id, max_24_hour_send=1, max_send_rate=10, reason="test"
            )
        )
    with _starttls_session(smtp_mesh, paused) as smtp:
        code, reply = _send(smtp, "news@example.test", ["a@example.test"], _message())
        assert (code, reply) == (554, "Sending paused for this account")
    with _starttls_session(smtp_mesh, sender) as smtp:
        _accepted_id(*_send(smtp, "news@example.test", ["a@example.test"], _message()))
        # Temporary, so clients keep the message and retry.
        code, reply = _send(smtp, "news@example.test", ["a@example.test"], _message())
        assert code == 454 and reply.startswith("Throttling failure"), reply


def test_a_client_dropping_the_connection_during_data_leaves_nothing_queued(
    smtp_mesh: SmtpMesh, sender: Sender
) -> None:
    smtp = _starttls_session(smtp_mesh, sender)
    assert smtp.mail("news@example.test")[0] == 250
    assert smtp.rcpt("a@example.test")[0] == 250
    assert smtp.docmd("DATA")[0] == 354
    smtp.send(_message()[:40])
    smtp.close()
    with smtp_mesh.mesh.client(sender.api_key) as client:
        assert sent_last_24_hours(client, 0, within=3) == 0
    assert of_type(email_events(smtp_mesh.nats_url, sender.account_id, timeout=1), SEND) == []


def test_suppressed_recipients_get_a_bounce_event_and_no_delivery(
    smtp_mesh: SmtpMesh, sender: Sender
) -> None:
    with smtp_mesh.mesh.client(sender.api_key) as client:
        client.feedback.PutSuppressedDestination(
            feedback_pb2.PutSuppressedDestinationRequest(
                email_address="gone@example.test", reason=feedback_pb2.SUPPRESSION_LIST_REASON_BOUNCE
            )
        )
    with _starttls_session(smtp_mesh, sender) as smtp:
        code, reply = _send(
            smtp,
            "news@example.test",
            ["kept@example.test", "gone@example.test"],
            _message(to="kept@example.test"),
        )
    message_id = _accepted_id(code, reply)
    assert _arrived(smtp_mesh.sink, message_id).recipients == ["kept@example.test"]
    events = _events_for(smtp_mesh, sender.account_id, message_id, SEND, ev.EMAIL_EVENT_TYPE_BOUNCE)
    (bounce,) = of_type(events, ev.EMAIL_EVENT_TYPE_BOUNCE)
    assert bounce.email.bounce.bounce_sub_type == ev.BOUNCE_SUB_TYPE_ON_ACCOUNT_SUPPRESSION_LIST
    assert [r.email_address for r in bounce.email.bounce.bounced_recipients] == ["gone@example.test"]


def test_sending_authorization_through_an_arn_header(smtp_mesh: SmtpMesh, sender: Sender) -> None:
    owner_id, owner_key = smtp_mesh.mesh.create_account("owner")
    arn = f"arn:aws:ses:local:{owner_id}:identity/brand.test"
    message = _message("news@brand.test", extra=f"X-SES-FROM-ARN: {arn}\r\n")
    with smtp_mesh.mesh.client(owner_key) as owner, _starttls_session(smtp_mesh, sender) as smtp:
        create_verified_domain(owner, smtp_mesh.zone, "brand.test")
        code, reply = _send(smtp, "news@brand.test", ["a@example.test"], message)
        assert code == 554 and "Message rejected" in reply, reply
        policy = {
            "Statement": [{"Effect": "Allow", "Principal": {"AWS": sender.account_id}, "Action": "ses:*"}]
        }
        owner.identity.PutEmailIdentityPolicy(
            identity_pb2.PutEmailIdentityPolicyRequest(
                email_identity="brand.test", policy_name="smtp", policy=json.dumps(policy)
            )
        )
        deadline = time.monotonic() + 30
        # Identity's answers are kept until its IdentityChanged event reaches the SMTP server.
        while code != 250 and time.monotonic() < deadline:
            time.sleep(0.2)
            code, reply = _send(smtp, "news@brand.test", ["a@example.test"], message)
    message_id = _accepted_id(code, reply)
    assert b"X-SES-FROM-ARN" not in _arrived(smtp_mesh.sink, message_id).data
    (send,) = of_type(_events_for(smtp_mesh, sender.account_id, message_id, SEND), SEND)
    assert send.email.mail.source_identity == "brand.test"


# --- Credentials.


def test_credentials_are_the_account_s_own_and_revocation_reaches_every_smtp_server_at_once(
    smtp_mesh: SmtpMesh, sender: Sender
) -> None:
    mesh = smtp_mesh.mesh
    other = _new_sender(smtp_mesh, "other.test")
    with mesh.client(other.api_key) as client:
        listed = client.identity.ListSmtpCredentials(smtp_pb.ListSmtpCredentialsRequest()).credentials
        assert [c.username for c in listed] == [other.username]
        code, *_ = refusal(
            lambda: client.identity.RevokeSmtpCredential(
                smtp_pb.RevokeSmtpCredentialRequest(username=sender.username)
            )
        )
        assert code == grpc.StatusCode.NOT_FOUND
    # Another replica of the SMTP server alone, in a process of its own.
    replica = _replica(smtp_mesh, "replica", auth_cache_seconds=3600.0)
    try:
        replica_port = smtp_mesh.unit(replica).server.starttls_ports[0]
        sessions = []
        for port in (smtp_mesh.starttls_port, replica_port):
            smtp = smtplib.SMTP("127.0.0.1", port, timeout=30)
            smtp.starttls(context=_client_tls())
            smtp.ehlo()
            smtp.login(sender.username, sender.password)  # the answer is now cached on both
            sessions.append(smtp)
        replica_id = _accepted_id(*_send(sessions[1], "news@example.test", ["a@example.test"], _message()))
        _arrived(smtp_mesh.sink, replica_id)
        with mesh.client(sender.api_key) as client:
            client.identity.RevokeSmtpCredential(
                smtp_pb.RevokeSmtpCredentialRequest(username=sender.username)
            )
        for smtp in sessions:
            deadline = time.monotonic() + 30
            while (reply_code := smtp.mail("news@example.test")[0]) == 250 and time.monotonic() < deadline:
                smtp.rset()
                time.sleep(0.2)
            assert reply_code == 535
            smtp.close()
        for port in (smtp_mesh.starttls_port, replica_port):
            with smtplib.SMTP("127.0.0.1", port, timeout=30) as smtp:
                smtp.starttls(context=_client_tls())
                with pytest.raises(smtplib.SMTPAuthenticationError) as refused:
                    smtp.login(sender.username, sender.password)
                assert refused.value.smtp_code == 535
    finally:
        replica.stop()
    with mesh.client(sender.api_key) as client:
        listed = client.identity.ListSmtpCredentials(
            smtp_pb.ListSmtpCredentialsRequest(include_revoked=True)
        ).credentials
        assert [(c.username, c.revoked) for c in listed] == [(sender.username, True)]


def test_repeated_authentication_failures_end_the_connection(smtp_mesh: SmtpMesh, sender: Sender) -> None:
    with smtplib.SMTP("127.0.0.1", smtp_mesh.starttls_port, timeout=30) as smtp:
        smtp.starttls(context=_client_tls())
        smtp.ehlo()
        plain = base64.b64encode(f"\0{sender.username}\0wrong".encode()).decode()
        assert smtp.docmd("AUTH", f"PLAIN {plain}")[0] == 535
        assert smtp.docmd("AUTH", f"PLAIN {plain}")[0] == 535
        assert smtp.docmd("AUTH", f"PLAIN {plain}") == (421, b"4.7.0 Too many failed authentication attempts")
        with pytest.raises(smtplib.SMTPServerDisconnected):
            smtp.noop()


def test_smtp_credentials_through_the_cli(
    smtp_mesh: SmtpMesh, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import re

    from postmesh.cli.main import main

    sender = _new_sender(smtp_mesh)
    monkeypatch.setenv("POSTMESH_ENDPOINT", smtp_mesh.mesh.address)
    monkeypatch.setenv("POSTMESH_API_KEY", sender.api_key)
    assert main(["smtp-credentials", "create", "--description", "cms"]) == 0
    out = capsys.readouterr().out
    found = re.search(r"username: (PM\w+)\npassword: (\S+)", out)
    assert found, out
    username, password = found.groups()
    with smtplib.SMTP("127.0.0.1", smtp_mesh.starttls_port, timeout=30) as smtp:
        smtp.starttls(context=_client_tls())
        assert smtp.login(username, password)[0] == 235
    assert main(["smtp-credentials", "list"]) == 0
    assert username in capsys.readouterr().out
    assert main(["smtp-credentials", "revoke", username]) == 0
    assert main(["smtp-credentials", "list", "--all", "--json"]) == 0
    assert '"revoked": true' in capsys.readouterr().out


@pytest.mark.skipif(shutil.which("swaks") is None, reason="Debian's swaks is not installed")
def test_swaks_sends_with_starttls_and_auth_plain(smtp_mesh: SmtpMesh, sender: Sender) -> None:
    result = subprocess.run(
        [
            "swaks",
            "--server",
            f"127.0.0.1:{smtp_mesh.starttls_port}",
            "--tls",
            "--auth",
            "PLAIN",
            "--auth-user",
            sender.username,
            "--auth-password",
            sender.password,
            "--from",
            "news@example.test",
            "--to",
            "e@example.test",
            "--header",
            "From: news@example.test",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    accepted = [line for line in result.stdout.splitlines() if "  250 Ok " in line]
    assert accepted, result.stdout
    _arrived(smtp_mesh.sink, accepted[-1].split("250 Ok ", 1)[1].strip())


# --- Limits.


def _greeting(port: int, source: str = "127.0.0.1") -> tuple[socket.socket, str]:
    conn = socket.create_connection(("127.0.0.1", port), timeout=30, source_address=(source, 0))
    return conn, conn.recv(1024).decode()


def _closed_by_server(conn: socket.socket, within: float = 30.0) -> bool:
    conn.settimeout(within)
    try:
        while conn.recv(1024):
            pass
    except TimeoutError:
        return False
    return True


def test_connections_are_limited_per_client_address_and_in_total(smtp_mesh: SmtpMesh) -> None:
    replica = _replica(smtp_mesh, "connections", smtp_max_connections_per_client=2, smtp_max_connections=3)
    port = smtp_mesh.unit(replica).server.starttls_ports[0]
    opened: list[socket.socket] = []
    try:
        for _ in range(2):
            conn, greeting = _greeting(port)
            opened.append(conn)
            assert greeting.startswith("220"), greeting
        conn, greeting = _greeting(port)
        assert greeting.startswith("421 4.7.0 Too many connections"), greeting
        assert _closed_by_server(conn)
        conn.close()
        conn, greeting = _greeting(port, source="127.0.0.3")  # another client
        opened.append(conn)
        assert greeting.startswith("220"), greeting
        conn, greeting = _greeting(port, source="127.0.0.4")  # over the total
        assert greeting.startswith("421"), greeting
        conn.close()
        opened.pop(0).close()
        deadline = time.monotonic() + 30
        while True:
            conn, greeting = _greeting(port)
            opened.append(conn)
            if greeting.startswith("220") or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert greeting.startswith("220"), greeting
        for conn in opened:
            conn.close()
        opened.clear()
        # Connections that went through TLS are counted out as well when they end.
        tls_port = smtp_mesh.unit(replica).server.tls_ports[0]
        for _ in range(4):
            deadline = time.monotonic() + 30
            while True:
                try:
                    with smtplib.SMTP("127.0.0.1", port, timeout=30) as smtp:
                        smtp.starttls(context=_client_tls())
                        assert smtp.noop()[0] == 250
                    with smtplib.SMTP_SSL("127.0.0.1", tls_port, timeout=30, context=_client_tls()) as smtp:
                        assert smtp.noop()[0] == 250
                    break
                except smtplib.SMTPException:
                    # 421 while the previous connection is still being counted out.
                    assert time.monotonic() < deadline
                    time.sleep(0.2)
        gate = smtp_mesh.unit(replica).server.gate
        deadline = time.monotonic() + 30
        while gate.open and time.monotonic() < deadline:
            time.sleep(0.1)
        assert gate.open == 0
    finally:
        for conn in opened:
            conn.close()
        replica.stop()


def test_messages_and_recipients_per_connection_and_the_data_timeout(
    smtp_mesh: SmtpMesh, sender: Sender
) -> None:
    replica = _replica(
        smtp_mesh,
        "per-connection",
        smtp_max_messages_per_connection=1,
        smtp_max_recipients_per_connection=2,
        smtp_data_timeout_seconds=2.0,
    )
    port = smtp_mesh.unit(replica).server.starttls_ports[0]

    def session() -> smtplib.SMTP:
        smtp = smtplib.SMTP("127.0.0.1", port, timeout=30)
        smtp.starttls(context=_client_tls())
        smtp.ehlo()
        smtp.login(sender.username, sender.password)
        return smtp

    try:
        with session() as smtp:
            _accepted_id(*_send(smtp, "news@example.test", ["a@example.test"], _message()))
            code, reply = smtp.mail("news@example.test")
            assert code == 452 and b"Too many messages on this connection" in reply
        with session() as smtp:
            assert smtp.mail("news@example.test")[0] == 250
            assert [smtp.rcpt(f"r{i}@example.test")[0] for i in range(3)] == [250, 250, 452]
        # DATA has a time limit of its own: a client trickling a line now and then is still cut.
        smtp = session()
        assert smtp.mail("news@example.test")[0] == 250
        assert smtp.rcpt("a@example.test")[0] == 250
        assert smtp.docmd("DATA")[0] == 354
        deadline = time.monotonic() + 30
        cut = False
        while not cut and time.monotonic() < deadline:
            try:
                smtp.send(b"X-Slow: line\r\n")
            except (OSError, smtplib.SMTPServerDisconnected):
                cut = True
            time.sleep(0.3)
        assert cut
        smtp.close()
    finally:
        replica.stop()
    sends = of_type(email_events(smtp_mesh.nats_url, sender.account_id, timeout=2), SEND)
    assert len(sends) == 1


def test_an_idle_connection_is_closed_after_the_command_timeout(smtp_mesh: SmtpMesh) -> None:
    replica = _replica(smtp_mesh, "idle", smtp_command_timeout_seconds=1.0)
    try:
        conn, greeting = _greeting(smtp_mesh.unit(replica).server.starttls_ports[0])
        assert greeting.startswith("220")
        assert _closed_by_server(conn)
        conn.close()
    finally:
        replica.stop()


def test_shutdown_tells_open_sessions_to_come_back(smtp_mesh: SmtpMesh, sender: Sender) -> None:
    replica = _replica(smtp_mesh, "shutdown")
    try:
        smtp = smtplib.SMTP("127.0.0.1", smtp_mesh.unit(replica).server.starttls_ports[0], timeout=30)
        smtp.starttls(context=_client_tls())
        smtp.ehlo()
        smtp.login(sender.username, sender.password)
    finally:
        replica.stop()
    assert smtp.getreply() == (421, b"4.3.2 Service shutting down; try again")
    smtp.close()


def test_a_renewed_certificate_is_served_without_a_restart(smtp_mesh: SmtpMesh) -> None:
    def served() -> bytes:
        with socket.create_connection(("127.0.0.1", smtp_mesh.tls_port), timeout=30) as raw:
            with _client_tls().wrap_socket(raw) as conn:
                certificate = conn.getpeercert(binary_form=True)
                assert certificate is not None
                return certificate

    before = served()
    write_self_signed(smtp_mesh.cert_dir / "cert.pem", smtp_mesh.cert_dir / "key.pem", "renewed.test")
    deadline = time.monotonic() + 30
    while (after := served()) == before and time.monotonic() < deadline:
        time.sleep(0.2)
    assert after != before


# --- Hostile input.

_HEADER_NAMES = [
    "From",
    "To",
    "Cc",
    "Bcc",
    "Subject",
    "Content-Type",
    "X-SES-MESSAGE-TAGS",
    "X-SES-CONFIGURATION-SET",
    "X-Postmesh-From-Arn",
    "Content-Disposition",
    "MIME-Version",
]


@st.composite
def _raw_messages(draw: st.DrawFn) -> bytes:
    text = st.text(st.characters(codec="utf-8", exclude_categories=["Cs"]), max_size=60)
    headers = draw(
        st.lists(
            st.tuples(st.sampled_from(_HEADER_NAMES) | st.text(min_size=1, max_size=12), text), max_size=8
        )
    )
    lines = [f"{name}: {value}" for name, value in headers]
    if draw(st.booleans()):
        lines.insert(0, "From: news@example.test")
    body = draw(st.binary(max_size=300) | text.map(str.encode))
    separator = draw(st.sampled_from(["\r\n", "\n"]))
    return separator.join(lines).encode() + (separator * 2).encode() + body


def test_hostile_raw_messages_get_a_reply_never_a_crash_or_a_local_error(smtp_mesh: SmtpMesh) -> None:
    sender = _new_sender(smtp_mesh)
    smtp = _starttls_session(smtp_mesh, sender)

    @settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    @given(_raw_messages() | st.binary(max_size=500))
    def check(data: bytes) -> None:
        code, reply = _send(smtp, "news@example.test", ["a@example.test"], data)
        assert code in (250, 552, 554), (code, reply, data)

    try:
        check()
    finally:
        smtp.close()


# --- Postfix as a client relaying through postmesh (the README's main.cf lines).

_POSTFIX_SERVICES = """\
pickup    unix  n       -       n       60      1       pickup
cleanup   unix  n       -       n       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
tlsmgr    unix  -       -       n       1000?   1       tlsmgr
rewrite   unix  -       -       n       -       -       trivial-rewrite
bounce    unix  -       -       n       -       0       bounce
defer     unix  -       -       n       -       0       bounce
trace     unix  -       -       n       -       0       bounce
verify    unix  -       -       n       -       1       verify
flush     unix  n       -       n       1000?   0       flush
proxymap  unix  -       -       n       -       -       proxymap
smtp      unix  -       -       n       -       -       smtp
relay     unix  -       -       n       -       -       smtp
showq     unix  n       -       n       -       -       showq
error     unix  -       -       n       -       -       error
retry     unix  -       -       n       -       -       error
discard   unix  -       -       n       -       -       discard
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
postlog   unix-dgram n  -       n       -       1       postlogd
"""


def _postfix_usable() -> bool:
    postfix = shutil.which("postfix") or "/usr/sbin/postfix"
    plain = list(Path("/usr/lib").glob("*/sasl2/libplain.so*"))
    return Path(postfix).exists() and bool(plain) and os.geteuid() == 0


@pytest.mark.skipif(
    not _postfix_usable(), reason="Debian's postfix (with SASL PLAIN, run as root) is not here"
)
def test_postfix_relays_through_postmesh_with_the_documented_settings(
    smtp_mesh: SmtpMesh, sender: Sender
) -> None:
    # Postfix's own user must reach its folders: pytest's tmp_path is private to root.
    base = Path(tempfile.mkdtemp(prefix="postmesh-postfix-"))
    base.chmod(0o755)
    try:
        _relay_through_postfix(smtp_mesh, sender, base)
    finally:
        shutil.rmtree(base, ignore_errors=True)


def _relay_through_postfix(smtp_mesh: SmtpMesh, sender: Sender, base: Path) -> None:
    etc, queue, data = base / "etc", base / "queue", base / "data"
    for folder in (etc, queue, data):
        folder.mkdir(parents=True)
    shutil.chown(data, "postfix", "postfix")
    inject_port = free_port()
    relay = f"[127.0.0.1]:{smtp_mesh.starttls_port}"
    (etc / "sasl_passwd").write_text(f"{relay} {sender.username}:{sender.password}\n")
    (etc / "sasl_passwd").chmod(0o600)
    (etc / "main.cf").write_text(
        f"""compatibility_level = 3.6
queue_directory = {queue}
data_directory = {data}
mail_owner = postfix
myhostname = client.postmesh.test
mydestination =
inet_interfaces = loopback-only
inet_protocols = ipv4
mynetworks = 127.0.0.0/8
alias_maps =
alias_database =
maillog_file = {base}/maillog
maillog_file_prefixes = {base}
# As in the README:
relayhost = {relay}
smtp_sasl_auth_enable = yes
smtp_sasl_password_maps = texthash:{etc}/sasl_passwd
smtp_sasl_security_options = noanonymous
smtp_sasl_tls_security_options = noanonymous
smtp_tls_security_level = encrypt
smtp_tls_note_starttls_offer = yes
"""
    )
    (etc / "master.cf").write_text(f"127.0.0.1:{inject_port} inet n - n - - smtpd\n" + _POSTFIX_SERVICES)
    postfix = shutil.which("postfix") or "/usr/sbin/postfix"

    def control(command: str) -> None:
        result = subprocess.run(
            ["script", "-qc", f"{postfix} -c {etc} {command}", "/dev/null"],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert result.returncode == 0, result.stdout + result.stderr

    control("start")
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                client = smtplib.SMTP("127.0.0.1", inject_port, timeout=30)
                break
            except OSError:
                assert time.monotonic() < deadline, "postfix did not listen"
                time.sleep(0.2)
        with client:
            client.sendmail(
                "news@example.test", ["f@example.test"], _message(to="f@example.test", subject="via postfix")
            )
        deadline = time.monotonic() + 60
        arrived: Received | None = None
        while arrived is None and time.monotonic() < deadline:
            arrived = next((r for r in smtp_mesh.sink.received if b"Subject: via postfix" in r.data), None)
            time.sleep(0.2)
        log = (base / "maillog").read_text() if (base / "maillog").exists() else ""
        assert arrived is not None, log[-3000:]
        # Postfix logs the relay's 250 reply, which names postmesh's MessageId.
        message_id = arrived.message_id.strip("<>").split("@")[0]
        assert f"250 Ok {message_id}" in log, log[-3000:]
        assert dkim.verify(arrived.data, dnsfunc=dkimpy_dns(smtp_mesh.zone))
    finally:
        control("stop")
