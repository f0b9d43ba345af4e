"""The feedback loop end to end: a message goes out through a real MX on loopback, the receiving
server later mails a DSN (or a provider an ARF report) back to the feedback service's SMTP listener,
and the account sees it as SES users do: the event, the suppression list, the statistics, the
reputation."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from postmesh.common.natsserver import free_port
from postmesh.events.v1 import events_pb2 as ev
from postmesh.feedback.v1 import feedback_pb2
from postmesh.identity.v1 import identity_pb2
from postmesh.quota.v1 import quota_pb2
from postmesh.sender.v1 import sender_pb2 as pb
from postmesh.testing import MeshThread
from postmesh.testing_mail import Behaviour, LoopbackDns, SmtpServer
from services.feedback.inbound.parsing import parse_report
from tests.conftest import MeshFactory
from tests.identity_helpers import create_verified_domain, mail_to
from tests.inbound_helpers import arf_report, deliver, eventually, inbound_port, postfix_dsn
from tests.sending_helpers import email_events, of_type, own_nats_server

BOUNCE = ev.EMAIL_EVENT_TYPE_BOUNCE
COMPLAINT = ev.EMAIL_EVENT_TYPE_COMPLAINT


@pytest.fixture
def zone() -> Iterator[LoopbackDns]:
    with LoopbackDns() as server:
        yield server


@pytest.fixture
def nats_url(tmp_path: Path) -> Iterator[str]:
    with own_nats_server(tmp_path / "nats") as url:
        yield url


@pytest.fixture
def mx() -> Iterator[SmtpServer]:
    refusals = {
        "full@example.test": "552 5.2.2 Mailbox full",
        "unknown@example.test": "550 5.1.1 User unknown",
    }
    with SmtpServer("127.0.0.2", free_port("127.0.0.2"), Behaviour(reject=refusals)) as server:
        yield server


@pytest.fixture
def world(start_mesh: MeshFactory, zone: LoopbackDns, mx: SmtpServer, nats_url: str) -> MeshThread:
    zone.add_mx("example.test", "mx.example.test", 10)
    zone.add_a("mx.example.test", "127.0.0.2")
    return start_mesh(
        sandbox_max_send_rate=1000.0,
        dns_resolver=zone.address,
        dns_check_poll_seconds=3600,
        dns_timeout_seconds=2,
        message_id_domain="mail.postmesh.test",
        delivery_mode="mx",
        delivery_workers=2,
        smtp_port=mx.port,
        default_bounce_domain="bounces.postmesh.test",
        reputation_min_volume=1,
        # Only complaints judge the account here: one bounce of few messages must not pause it.
        reputation_bounce_review_rate=2.0,
        reputation_bounce_pause_rate=2.0,
        reputation_complaint_review_rate=0.2,
        reputation_complaint_pause_rate=0.5,
    )


def _send(client: object, to: str) -> str:
    request = pb.SendEmailRequest(
        from_email_address="News <news@example.test>",
        destination=pb.Destination(to_addresses=[to]),
        content=pb.EmailContent(
            simple=pb.Message(subject=pb.Content(data="Hello"), body=pb.Body(text=pb.Content(data="Hi")))
        ),
    )
    return str(client.sender.SendEmail(request).message_id)  # type: ignore[attr-defined]


def _indexed(mesh: MeshThread, message_id: str) -> None:
    assert mesh.server is not None
    inbound = mesh.server.services["feedback"].inbound  # type: ignore[attr-defined]
    eventually(lambda: mesh.run(inbound.messages.by_id(message_id)), what=f"{message_id} indexed")


def test_a_dsn_to_the_verp_address_bounces_suppresses_and_counts_once(
    world: MeshThread, zone: LoopbackDns, mx: SmtpServer
) -> None:
    account_id, key = world.create_account()
    with world.client(key) as client:
        create_verified_domain(client, zone, "example.test")
        message_id = _send(client, "gone@example.test")
        arrived = mail_to(mx, "gone@example.test")
        _indexed(world, message_id)
        # Later, as Postfix does once the mailbox store refuses it: a DSN to the envelope sender.
        dsn = postfix_dsn(
            return_path=arrived.mail_from,
            recipient="gone@example.test",
            status="5.1.1",
            diagnostic="550 5.1.1 <gone@example.test>: Recipient address rejected: User unknown",
            original=arrived.data,
        )
        code, reply = deliver(inbound_port(world), "", [arrived.mail_from], dsn)
        assert code == 250 and b"Recorded" in reply

        events = email_events(
            world.settings.nats_url, account_id, until=lambda e: len(of_type(e, BOUNCE)) >= 1
        )
        [bounce_event] = of_type(events, BOUNCE)
        bounce = bounce_event.email.bounce
        assert (bounce.bounce_type, bounce.bounce_sub_type) == (
            ev.BOUNCE_TYPE_PERMANENT,
            ev.BOUNCE_SUB_TYPE_NO_EMAIL,
        )
        [recipient] = bounce.bounced_recipients
        assert (recipient.email_address, recipient.status, recipient.action) == (
            "gone@example.test",
            "5.1.1",
            "failed",
        )
        assert "User unknown" in recipient.diagnostic_code
        assert bounce.reporting_mta == "dns; mx.remote.test" and bounce.remote_mta_ip == "127.0.0.9"
        mail = bounce_event.email.mail
        assert mail.message_id == message_id and mail.source == "news@example.test"
        assert {h.name: h.value for h in mail.headers}["Subject"] == "Hello"

        suppressed = eventually(
            lambda: _suppressed(client, "gone@example.test"), what="address on the suppression list"
        )
        assert suppressed.reason == feedback_pb2.SUPPRESSION_LIST_REASON_BOUNCE
        assert suppressed.message_id == message_id

        # The same DSN again (an MTA retrying) is one bounce, not two.
        assert deliver(inbound_port(world), "", [arrived.mail_from], dsn)[0] == 250
        # The next send to the address is suppressed, not delivered.
        again = _send(client, "gone@example.test")
        events = email_events(
            world.settings.nats_url,
            account_id,
            until=lambda e: any(x.email.mail.message_id == again for x in of_type(e, BOUNCE)),
        )
        bounces = of_type(events, BOUNCE)
        assert [e.email.bounce.bounce_sub_type for e in bounces if e.email.mail.message_id == again] == [
            ev.BOUNCE_SUB_TYPE_ON_ACCOUNT_SUPPRESSION_LIST
        ]
        assert len([e for e in bounces if e.email.mail.message_id == message_id]) == 1
        assert len(mx.received) == 1
        stats = eventually(
            lambda: _bounces_counted(client),
            what="bounce counted in the statistics",
        )
        assert stats == 1


def _mail_back_a_dsn(
    world: MeshThread, mx: SmtpServer, message_id: str, recipient: str, status: str, diagnostic: str
) -> None:
    """What Postfix does when the mailbox store refuses a message it accepted: a DSN to its VERP sender."""
    arrived = mail_to(mx, recipient)
    _indexed(world, message_id)
    dsn = postfix_dsn(
        return_path=arrived.mail_from,
        recipient=recipient,
        status=status,
        diagnostic=diagnostic,
        original=arrived.data,
    )
    assert deliver(inbound_port(world), "", [arrived.mail_from], dsn)[0] == 250


def _bounces_counted(client: object) -> int:
    points = client.quota.GetSendStatistics(quota_pb2.GetSendStatisticsRequest()).send_data_points  # type: ignore[attr-defined]
    return sum(p.bounces for p in points)


def _suppressed(client: object, address: str) -> feedback_pb2.SuppressedDestination | None:
    try:
        return client.feedback.GetSuppressedDestination(  # type: ignore[attr-defined]
            feedback_pb2.GetSuppressedDestinationRequest(email_address=address)
        ).suppressed_destination
    except grpc.RpcError as exc:
        if exc.code() == grpc.StatusCode.NOT_FOUND:
            return None
        raise


def test_arf_complaints_suppress_move_the_complaint_rate_and_pause_the_account(
    world: MeshThread, zone: LoopbackDns, mx: SmtpServer
) -> None:
    account_id, key = world.create_account()
    other_id, other_key = world.create_account("someone else")
    with world.client(key) as client:
        create_verified_domain(client, zone, "example.test")
        recipients = [f"reader{i}@example.test" for i in range(4)]
        ids = [_send(client, r) for r in recipients]
        arrived = [mail_to(mx, r) for r in recipients]
        for message_id in ids:
            _indexed(world, message_id)
        port = inbound_port(world)
        fbl = "fbl@bounces.postmesh.test"

        report = arf_report(original=arrived[0].data, recipient=recipients[0])
        assert deliver(port, "staff@hotmail.example", [fbl], report)[0] == 250
        events = email_events(
            world.settings.nats_url, account_id, until=lambda e: len(of_type(e, COMPLAINT)) >= 1
        )
        [event] = of_type(events, COMPLAINT)
        complaint = event.email.complaint
        assert [r.email_address for r in complaint.complained_recipients] == [recipients[0]]
        assert complaint.complaint_feedback_type == "abuse"
        assert complaint.user_agent == "Yahoo!-Mail-Feedback/2.0"
        assert complaint.arrival_date.ToSeconds() > 0
        assert event.email.mail.message_id == ids[0]
        suppressed = eventually(lambda: _suppressed(client, recipients[0]), what="complainer suppressed")
        assert suppressed.reason == feedback_pb2.SUPPRESSION_LIST_REASON_COMPLAINT

        status = eventually(lambda: _status(client, "PROBATION"), what="account under review")
        assert status.reputation.complaints_in_window == 1 and status.reputation.complaint_rate > 0
        assert (
            deliver(
                port,
                "staff@hotmail.example",
                [fbl],
                arf_report(original=arrived[1].data, recipient=recipients[1]),
            )[0]
            == 250
        )
        eventually(lambda: _status(client, "SHUTDOWN"), what="account paused")

    # Nothing of it reached another account.
    with world.client(other_key) as other:
        assert _suppressed(other, recipients[0]) is None
    assert email_events(world.settings.nats_url, other_id, timeout=1) == []


def _status(client: object, name: str) -> quota_pb2.GetAccountResponse | None:
    reply = client.quota.GetAccount(quota_pb2.GetAccountRequest())  # type: ignore[attr-defined]
    return reply if quota_pb2.EnforcementStatus.Name(reply.enforcement_status).endswith(name) else None


def test_bounces_are_forwarded_to_the_feedback_forwarding_address(
    world: MeshThread, zone: LoopbackDns, mx: SmtpServer
) -> None:
    _, key = world.create_account()
    with world.client(key) as client:
        create_verified_domain(client, zone, "example.test")
        request = pb.SendEmailRequest(
            from_email_address="news@example.test",
            destination=pb.Destination(to_addresses=["moved@example.test"]),
            feedback_forwarding_email_address="feedback@example.test",
            content=pb.EmailContent(
                simple=pb.Message(subject=pb.Content(data="Hello"), body=pb.Body(text=pb.Content(data="Hi")))
            ),
        )
        message_id = client.sender.SendEmail(request).message_id
        _mail_back_a_dsn(
            world, mx, message_id, "moved@example.test", "5.1.6", "550 5.1.6 No longer on server"
        )
        notice = mail_to(mx, "feedback@example.test")
    # A DSN of its own, from the system identity's domain, that postmesh itself would read back.
    assert notice.mail_from.startswith("bounce+") and notice.recipients == ["feedback@example.test"]
    parsed = parse_report(notice.data, null_sender=False)
    assert parsed.format == "dsn" and [r.address for r in parsed.recipients] == ["moved@example.test"]
    assert parsed.recipients[0].status == "5.1.6"
    assert parsed.original_message_id == f"{message_id}@mail.postmesh.test"
    assert b"From: MAILER-DAEMON@postmesh.test" in notice.data
    # Only the one notice: nothing about the notice itself, nothing to the bounced address.
    assert [r.recipients for r in mx.received] == [["moved@example.test"], ["feedback@example.test"]]


def test_an_identity_with_feedback_forwarding_gets_notices_at_the_sender_address(
    world: MeshThread, zone: LoopbackDns, mx: SmtpServer
) -> None:
    _, key = world.create_account()
    with world.client(key) as client:
        create_verified_domain(client, zone, "example.test")
        get = identity_pb2.GetEmailIdentityRequest(email_identity="example.test")
        # Off here (MeshThread's FEEDBACK_FORWARDING_DEFAULT), as an operator may choose; SES's default is on.
        assert not client.identity.GetEmailIdentity(get).feedback_forwarding_status
        client.identity.PutEmailIdentityFeedbackAttributes(
            identity_pb2.PutEmailIdentityFeedbackAttributesRequest(
                email_identity="example.test", email_forwarding_enabled=True
            )
        )
        assert client.identity.GetEmailIdentity(get).feedback_forwarding_status
        message_id = _send(client, "gone2@example.test")
        _mail_back_a_dsn(world, mx, message_id, "gone2@example.test", "5.1.1", "550 5.1.1 User unknown")
        notice = mail_to(mx, "news@example.test")
    assert parse_report(notice.data, null_sender=False).recipients[0].address == "gone2@example.test"


def test_a_full_mailbox_during_the_smtp_session_is_transient_and_never_suppresses(
    world: MeshThread, zone: LoopbackDns
) -> None:
    account_id, key = world.create_account()
    with world.client(key) as client:
        create_verified_domain(client, zone, "example.test")
        full = _send(client, "full@example.test")
        unknown = _send(client, "unknown@example.test")
        events = email_events(
            world.settings.nats_url, account_id, until=lambda e: len(of_type(e, BOUNCE)) >= 2
        )
        kinds = {
            e.email.mail.message_id: (e.email.bounce.bounce_type, e.email.bounce.bounce_sub_type)
            for e in of_type(events, BOUNCE)
        }
        assert kinds[full] == (ev.BOUNCE_TYPE_TRANSIENT, ev.BOUNCE_SUB_TYPE_MAILBOX_FULL)
        assert kinds[unknown] == (ev.BOUNCE_TYPE_PERMANENT, ev.BOUNCE_SUB_TYPE_NO_EMAIL)
        # The suppression consumer takes bounces in order: once the later one is on the list, the
        # earlier one was seen, and left off.
        eventually(lambda: _suppressed(client, "unknown@example.test"), what="hard bounce suppressed")
        assert _suppressed(client, "full@example.test") is None
