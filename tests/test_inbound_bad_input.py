"""Hostile and broken returned mail at the inbound listener: forged and tampered bounce addresses,
reports about other accounts' messages or unknown ones, malformed MIME, oversized reports, bounces
of bounces, too many connections. Each is kept (with its reason) or refused; none crosses accounts,
crashes the listener or makes it send anything."""

from __future__ import annotations

import smtplib
import socket

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from postmesh.common.verp import VerpKey, bounce_address
from postmesh.events.v1 import events_pb2 as ev
from postmesh.identity.v1 import identity_pb2
from postmesh.testing import MeshThread
from postmesh.testing_mail import LoopbackDns
from services.feedback.inbound.parsing import parse_report
from services.feedback.inbound.report import Kind, Report
from tests.conftest import MeshFactory
from tests.delivery_helpers import new_account_id
from tests.identity_helpers import create_verified_domain
from tests.inbound_helpers import deliver, eventually, inbound_port, postfix_dsn
from tests.sending_helpers import email_events

DOMAIN = "bounces.postmesh.test"
ORIGINAL = b"Message-ID: <m-a@mail.postmesh.test>\r\nFrom: news@example.test\r\nSubject: Hi\r\n\r\nHi.\r\n"


def _mesh(start_mesh: MeshFactory, **extra: object) -> MeshThread:
    return start_mesh(("feedback",), default_bounce_domain=DOMAIN, **extra)


def _index(mesh: MeshThread, account: str, message_id: str, to: str) -> None:
    assert mesh.server is not None
    inbound = mesh.server.services["feedback"].inbound  # type: ignore[attr-defined]
    mail = ev.Mail(
        message_id=message_id,
        destination=[to],
        headers=[ev.Header(name="Message-ID", value=f"<{message_id}@mail.postmesh.test>")],
    )
    mesh.run(inbound.messages.record(account, mail))


def _kept(mesh: MeshThread, reply: bytes) -> str:
    assert mesh.server is not None
    inbound = mesh.server.services["feedback"].inbound  # type: ignore[attr-defined]
    report_id = reply.decode().rpartition(" ")[2]
    return str(mesh.run(inbound.kept.get(report_id)).reason)


def _dsn(to: str, recipient: str) -> bytes:
    return postfix_dsn(
        return_path=to,
        recipient=recipient,
        status="5.1.1",
        diagnostic="550 5.1.1 User unknown",
        original=ORIGINAL,
    )


def test_only_bounce_and_feedback_addresses_are_accepted(start_mesh: MeshFactory) -> None:
    with LoopbackDns() as zone:
        mesh = start_mesh(
            default_bounce_domain=DOMAIN,
            dns_resolver=zone.address,
            dns_check_poll_seconds=3600,
            dns_timeout_seconds=2,
        )
        _, key = mesh.create_account()
        with mesh.client(key) as client:
            create_verified_domain(client, zone, "customer.test")
            client.identity.PutEmailIdentityMailFromAttributes(
                identity_pb2.PutEmailIdentityMailFromAttributesRequest(
                    email_identity="customer.test", mail_from_domain="mail.customer.test"
                )
            )
            port = inbound_port(mesh)
            verp_key = VerpKey.from_settings(mesh.settings)
            with smtplib.SMTP("127.0.0.1", port, timeout=30) as smtp:
                smtp.ehlo("mx.remote.test")
                assert smtp.has_extn("starttls") and smtp.has_extn("size")
                smtp.mail("")
                assert smtp.rcpt("someone@elsewhere.test")[0] == 550
                assert smtp.rcpt("postmaster@[127.0.0.1]")[0] == 550
                # Even a genuine bounce address, at a domain that is not a bounce domain.
                assert smtp.rcpt(bounce_address("m", "a@b.test", "elsewhere.test", verp_key))[0] == 550
                # The custom MAIL FROM domain, the feedback loop, the bounce domain.
                assert smtp.rcpt(bounce_address("m", "a@b.test", "mail.customer.test", verp_key))[0] == 250
                assert smtp.rcpt(f"fbl@{DOMAIN}")[0] == 250
                assert smtp.rcpt(f"postmaster@{DOMAIN}")[0] == 250
            # Once the identity is gone, so is its MAIL FROM domain (the cached answer is dropped).
            client.identity.DeleteEmailIdentity(
                identity_pb2.DeleteEmailIdentityRequest(email_identity="customer.test")
            )
            eventually(
                lambda: _rcpt_code(port, "anyone@mail.customer.test") == 550, what="MAIL FROM domain dropped"
            )


def _rcpt_code(port: int, address: str) -> int:
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as smtp:
        smtp.ehlo("mx.remote.test")
        smtp.mail("")
        return int(smtp.rcpt(address)[0])


def test_forged_or_tampered_bounce_addresses_map_to_nothing(start_mesh: MeshFactory) -> None:
    acct_a, acct_b = new_account_id(), new_account_id()
    mesh = _mesh(start_mesh)
    port = inbound_port(mesh)
    key = VerpKey.from_settings(mesh.settings)
    _index(mesh, acct_a, "m-a", "alice@remote.test")
    _index(mesh, acct_b, "m-b", "bob@remote.test")
    forged = bounce_address("m-a", "alice@remote.test", DOMAIN, VerpKey(b"guessed"))
    code, reply = deliver(port, "", [forged], _dsn(forged, "alice@remote.test"))
    assert code == 250 and "no valid tag" in _kept(mesh, reply)
    # B's tag on A's message id.
    genuine_b = bounce_address("m-b", "bob@remote.test", DOMAIN, key)
    tampered = genuine_b.replace("bounce+m-b-", "bounce+m-a-")
    code, reply = deliver(port, "", [tampered], _dsn(tampered, "bob@remote.test"))
    assert code == 250 and "no valid tag" in _kept(mesh, reply)
    # A's genuine address, but a report naming B's recipient: never suppresses anyone of B's.
    genuine_a = bounce_address("m-a", None, DOMAIN, key)
    code, reply = deliver(port, "", [genuine_a], _dsn(genuine_a, "bob@remote.test"))
    assert code == 250 and "names none of its recipients" in _kept(mesh, reply)
    for account in (acct_a, acct_b):
        assert email_events(mesh.settings.nats_url, account, timeout=1) == []


def test_a_report_about_another_accounts_message_goes_to_that_account(start_mesh: MeshFactory) -> None:
    acct_a, acct_b = new_account_id(), new_account_id()
    mesh = _mesh(start_mesh)
    _index(mesh, acct_b, "m-b", "bob@remote.test")
    arf = (
        b"From: abuse@provider.test\r\nTo: fbl@bounces.postmesh.test\r\nSubject: report\r\n"
        b"MIME-Version: 1.0\r\n"
        b'Content-Type: multipart/report; report-type=feedback-report; boundary="x"\r\n\r\n'
        b"--x\r\nContent-Type: message/feedback-report\r\n\r\nFeedback-Type: abuse\r\n"
        b"Original-Rcpt-To: <bob@remote.test>\r\n\r\n--x\r\nContent-Type: text/rfc822-headers\r\n\r\n"
        b"Message-ID: <m-b@mail.postmesh.test>\r\nX-Account: accta\r\n\r\n--x--\r\n"
    )
    assert deliver(inbound_port(mesh), "abuse@provider.test", [f"fbl@{DOMAIN}"], arf)[0] == 250
    [event] = email_events(mesh.settings.nats_url, acct_b, until=lambda e: len(e) >= 1)
    assert event.email.event_type == ev.EMAIL_EVENT_TYPE_COMPLAINT and event.account_id == acct_b
    assert email_events(mesh.settings.nats_url, acct_a, timeout=1) == []


def test_an_unknown_message_is_kept_and_maps_on_retry_once_known(start_mesh: MeshFactory) -> None:
    acct_late = new_account_id()
    mesh = _mesh(start_mesh)
    key = VerpKey.from_settings(mesh.settings)
    to = bounce_address("m-late", "late@remote.test", DOMAIN, key)
    code, reply = deliver(inbound_port(mesh), "", [to], _dsn(to, "late@remote.test"))
    assert code == 250 and "not known" in _kept(mesh, reply)
    _index(mesh, acct_late, "m-late", "late@remote.test")
    assert mesh.server is not None
    inbound = mesh.server.services["feedback"].inbound  # type: ignore[attr-defined]
    outcome = mesh.run(inbound.processor.retry(reply.decode().rpartition(" ")[2]))
    assert outcome.events and not outcome.kept_id
    [event] = email_events(mesh.settings.nats_url, acct_late, until=lambda e: len(e) >= 1)
    assert event.email.bounce.bounce_type == ev.BOUNCE_TYPE_PERMANENT


def test_malformed_mime_and_a_bounce_of_a_bounce_are_kept(start_mesh: MeshFactory) -> None:
    mesh = _mesh(start_mesh)
    port = inbound_port(mesh)
    junk = b'Content-Type: multipart/report; boundary="\r\n\r\n--\x00\xff\xfe broken\r\n' * 50
    code, reply = deliver(port, "", [f"anything@{DOMAIN}"], junk)
    assert code == 250 and b"Kept" in reply
    # A bounce of a bounce: the returned message was itself a bounce sent to a bounce address.
    inner = _dsn(f"bounce+x-0-aaaa@{DOMAIN}", "mailer-daemon@remote.test")
    outer = postfix_dsn(
        return_path="",
        recipient=f"bounce+x-0-aaaa@{DOMAIN}",
        status="5.1.1",
        diagnostic="550 5.1.1 unknown",
        original=inner,
    )
    code, reply = deliver(port, "", [f"bounce+x-0-aaaa@{DOMAIN}"], outer)
    assert code == 250 and "no valid tag" in _kept(mesh, reply)


def test_oversized_reports_are_refused_with_552(start_mesh: MeshFactory) -> None:
    mesh = _mesh(start_mesh)
    port = inbound_port(mesh)
    with smtplib.SMTP("127.0.0.1", port, timeout=60) as smtp:
        smtp.ehlo("mx.remote.test")
        assert smtp.mail("", ["SIZE=52428800"])[0] == 552
    big = b"Subject: big\r\n\r\n" + (b"x" * 998 + b"\r\n") * (50 * 1024 * 1024 // 1000)
    code, _ = deliver(port, "", [f"anything@{DOMAIN}"], big)
    assert code == 552
    # The listener is still there.
    assert deliver(port, "", [f"anything@{DOMAIN}"], b"Subject: small\r\n\r\nx\r\n")[0] == 250


def test_connections_over_the_limit_are_told_421(start_mesh: MeshFactory) -> None:
    mesh = _mesh(start_mesh, inbound_max_connections=2)
    port = inbound_port(mesh)
    held = [smtplib.SMTP("127.0.0.1", port, timeout=30) for _ in range(2)]
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=30) as extra:
            assert extra.recv(200).startswith(b"421")
    finally:
        for smtp in held:
            smtp.quit()
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as smtp:
        assert smtp.noop()[0] == 250


def test_one_client_address_cannot_take_every_connection(start_mesh: MeshFactory) -> None:
    mesh = _mesh(start_mesh, inbound_max_connections=10, inbound_max_connections_per_client=2)
    port = inbound_port(mesh)
    held = [smtplib.SMTP("127.0.0.1", port, timeout=30) for _ in range(2)]
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=30) as extra:
            assert extra.recv(200).startswith(b"421")
        # Another client address still gets in while the first is at its limit.
        with smtplib.SMTP("127.0.0.1", port, timeout=30, source_address=("127.0.0.2", 0)) as other:
            assert other.noop()[0] == 250
    finally:
        for smtp in held:
            smtp.quit()
    # The slots are given back when the connections close.
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as smtp:
        assert smtp.noop()[0] == 250


_HEADER_NAMES = [
    "Content-Type",
    "Subject",
    "From",
    "Auto-Submitted",
    "Content-Transfer-Encoding",
    "Message-ID",
]
_VALUES = [
    "multipart/report; report-type=delivery-status; boundary=b",
    "multipart/report; report-type=feedback-report; boundary=b",
    "message/delivery-status",
    "message/feedback-report",
    "message/rfc822",
    "text/rfc822-headers",
    "base64",
    "quoted-printable",
    "Undelivered Mail Returned to Sender",
    "MAILER-DAEMON@x.test",
    "auto-replied",
]
_LINES = st.one_of(
    st.builds(lambda n, v: f"{n}: {v}", st.sampled_from(_HEADER_NAMES), st.sampled_from(_VALUES)),
    st.sampled_from(
        ["--b", "--b--", "", "Final-Recipient: rfc822; a@b.test", "Action: failed", "Status: 5.1.1"]
    ),
    st.sampled_from(["Feedback-Type: abuse", "Original-Rcpt-To: <x@y.test>", "Diagnostic-Code: smtp; 550"]),
    st.text(max_size=80),
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.one_of(
        st.binary(max_size=4000),
        st.lists(_LINES, max_size=60).map(lambda ls: "\r\n".join(ls).encode("utf-8", "surrogatepass")),
    )
)
def test_the_parser_never_raises_on_hostile_mime(raw: bytes) -> None:
    for null_sender in (True, False):
        report = parse_report(raw, null_sender=null_sender, to_feedback_loop=not null_sender)
        assert isinstance(report, Report)
        if report.kind is Kind.NONE:
            assert report.reason
        else:
            assert report.kind is Kind.COMPLAINT or report.recipients
