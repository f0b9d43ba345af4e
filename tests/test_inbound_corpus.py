"""The bounce and complaint corpus (tests/inbound_corpus: RFC 3464 and RFC 5965 examples, and the
shapes Postfix, Exim, Sendmail, qmail, Exchange/Office 365, Gmail, Yahoo and Lotus Domino write),
each read by the parser and each fed through the real SMTP listener to the events it records."""

from __future__ import annotations

from pathlib import Path

import pytest

from postmesh.common.bounces import classify
from postmesh.common.verp import VerpKey, bounce_address
from postmesh.events.v1 import events_pb2 as ev
from postmesh.testing import MeshThread
from services.feedback.inbound.parsing import parse_report
from services.feedback.inbound.processing import recipient_class
from services.feedback.inbound.report import Kind
from tests.conftest import MeshFactory
from tests.delivery_helpers import new_account_id
from tests.inbound_helpers import deliver, inbound_port
from tests.sending_helpers import email_events

CORPUS = Path(__file__).parent / "inbound_corpus"
P, T = ev.BOUNCE_TYPE_PERMANENT, ev.BOUNCE_TYPE_TRANSIENT
GENERAL, NO_EMAIL = ev.BOUNCE_SUB_TYPE_GENERAL, ev.BOUNCE_SUB_TYPE_NO_EMAIL
FULL, LARGE = ev.BOUNCE_SUB_TYPE_MAILBOX_FULL, ev.BOUNCE_SUB_TYPE_MESSAGE_TOO_LARGE
CONTENT, ATTACHMENT = ev.BOUNCE_SUB_TYPE_CONTENT_REJECTED, ev.BOUNCE_SUB_TYPE_ATTACHMENT_REJECTED

# file -> (kind, {recipient: (type, subtype, status)}) for bounces, (kind, feedback type, [recipients])
# for complaints, (Kind.NONE, reason fragment) for what records nothing.
BOUNCES: dict[str, dict[str, tuple[int, int, str]]] = {
    "01-rfc3464-permanent": {"louisl@larry.remote.test": (P, GENERAL, "5.0.0")},
    "02-rfc3464-multiple-recipients": {
        "arathib@vnet.remote.test": (P, GENERAL, "5.0.0"),
        "wsnell@sdcc13.remote.test": (P, NO_EMAIL, "5.0.0"),
        "fun@nowhere.remote.test": (T, GENERAL, "4.4.7"),
    },
    "04-postfix-dsn-mailbox-full": {"full@remote.test": (T, FULL, "5.2.2")},
    "05-postfix-dsn-too-large": {"big@remote.test": (T, LARGE, "5.3.4")},
    "06-dsn-content-rejected": {"filtered@remote.test": (T, CONTENT, "5.7.1")},
    "07-dsn-attachment-rejected": {"careful@remote.test": (T, ATTACHMENT, "5.7.1")},
    "08-exchange-dsn": {"kim@contoso.test": (P, GENERAL, "5.1.10")},
    "09-gmail-dsn": {"nosuchuser@gmail.test": (P, NO_EMAIL, "5.1.1")},
    "10-dsn-status-only-4xx-failed": {"offline@remote.test": (T, GENERAL, "4.4.1")},
    "11-postfix-plain": {"nobody@remote.test": (P, NO_EMAIL, "5.1.1")},
    "12-exim": {"ghost@exim.test": (P, NO_EMAIL, "5.1.1")},
    "13-exim-quota": {"hoarder@exim.test": (T, FULL, "4.0.0")},
    "14-exim-no-status": {"former.employee@exim.test": (P, GENERAL, "5.0.0")},
    "15-sendmail": {"missing@smail.test": (P, NO_EMAIL, "5.1.1")},
    "16-qmail": {"nouser@qmail.test": (P, NO_EMAIL, "5.1.1")},
    "17-qmail-no-code": {"olduser@qmail.test": (P, NO_EMAIL, "5.1.1")},
    "18-exchange-plain": {"pat@contoso.test": (P, NO_EMAIL, "5.1.1")},
    "19-office365-mailbox-full": {"alex@fabrikam.test": (T, FULL, "5.2.2")},
    "20-gmail-plain": {"lost.user@gmail.test": (P, NO_EMAIL, "5.1.1")},
    "21-gmail-temporary": {"busy@gmail.test": (T, FULL, "4.2.2")},
    "22-yahoo": {"nobody.here@yahoo.test": (P, NO_EMAIL, "5.0.0")},
    "23-yahoo-full": {"stuffed@yahoo.test": (T, FULL, "5.0.0")},
    "24-domino": {"john.doe@domino.test": (P, NO_EMAIL, "5.1.1")},
    "25-domino-full": {"jane.roe@domino.test": (T, FULL, "4.0.0")},
    "26-generic-undelivered": {"someone.else@legacy.test": (P, NO_EMAIL, "5.0.0")},
    "27-generic-returned-mail": {"user@no-such-domain.test": (P, GENERAL, "5.1.2")},
    "29-auto-reply-rfc3834": {"robin@remote.test": (T, GENERAL, "")},
    "30-out-of-office-exchange": {"sam@contoso.test": (T, GENERAL, "")},
    "31-vacation-precedence": {"vacationer@remote.test": (T, GENERAL, "")},
    "32-challenge-response": {"careful.reader@cr.remote.test": (T, GENERAL, "")},
}
COMPLAINTS: dict[str, tuple[str, str, list[str]]] = {
    "33-arf-abuse": ("abuse", "SomeGenerator/1.0", ["user@provider.test"]),
    "34-arf-redacted-headers-only": ("abuse", "Hotmail FBL", ["redacted@hotmail.test"]),
    "35-arf-not-spam": ("not-spam", "Mailbox-FBL/3.1", ["happy@mailbox.test"]),
    "36-forwarded-complaint": ("abuse", "", ["angry@small-isp.test"]),
    "37-arf-virus": ("virus", "ScannerFBL/0.9", ["scanned@scanner.test"]),
}
NOTHING = {"03-rfc3464-delayed-only": "delayed", "28-exim-delay-warning": "delay"}


def _raw(name: str) -> bytes:
    return (CORPUS / f"{name}.eml").read_bytes().replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")


def _to_fbl(raw: bytes) -> bool:
    return b"fbl@bounces.postmesh.test" in raw


def test_the_corpus_is_all_described_and_covers_every_format() -> None:
    files = {p.stem for p in CORPUS.glob("*.eml")}
    assert files == set(BOUNCES) | set(COMPLAINTS) | set(NOTHING)
    assert len(files) >= 30
    formats = {parse_report(_raw(n), to_feedback_loop=_to_fbl(_raw(n))).format for n in files}
    expected = {"dsn", "arf", "auto-reply", "forwarded-complaint", "postfix", "exim", "sendmail", "qmail"}
    assert formats >= expected | {"exchange", "gmail", "yahoo", "domino", "generic"}


def test_classification_accuracy_over_the_corpus() -> None:
    """Per recipient: found, permanent/temporary right (a recipient found that is not expected is an
    error too); prints the figures, and holds them to 95%."""
    right = wrong = exact = 0
    misses: list[str] = []
    for name, expected in BOUNCES.items():
        report = parse_report(_raw(name))
        found = {r.address.lower(): r for r in report.recipients}
        for address, (bounce_type, sub_type, status) in expected.items():
            recipient = found.pop(address, None)
            if recipient is None:
                wrong += 1
                misses.append(f"{name}: {address} not found")
                continue
            klass = recipient_class(report, recipient)
            if klass.bounce_type == bounce_type:
                right += 1
                exact += (klass.bounce_sub_type, recipient.status) == (sub_type, status)
            else:
                wrong += 1
                misses.append(f"{name}: {address} {klass}")
        for address in found:
            wrong += 1
            misses.append(f"{name}: {address} found but not a failed recipient")
    for name, (_, _, recipients) in COMPLAINTS.items():
        raw = _raw(name)
        report = parse_report(raw, null_sender=False, to_feedback_loop=_to_fbl(raw))
        got = {r.address.lower() for r in report.recipients}
        ok = report.kind is Kind.COMPLAINT and got == set(recipients)
        right, wrong = right + ok, wrong + (not ok)
        if not ok:
            misses.append(f"{name}: {report.kind} {sorted(got)}")
    total = right + wrong
    print(
        f"\ninbound corpus: {right}/{total} recipients found and permanent/temporary right "
        f"({100 * right / total:.1f}%), {exact} with the exact SES subtype and status"
    )
    for miss in misses:
        print("  miss:", miss)
    assert right / total >= 0.95, misses


@pytest.mark.parametrize("name", sorted(BOUNCES))
def test_bounce_samples_classify_exactly(name: str) -> None:
    report = parse_report(_raw(name))
    assert report.kind is Kind.BOUNCE
    got = {r.address.lower(): (*_pair(recipient_class(report, r)), r.status) for r in report.recipients}
    assert got == BOUNCES[name]


def _pair(klass: object) -> tuple[int, int]:
    return klass.bounce_type, klass.bounce_sub_type  # type: ignore[attr-defined]


@pytest.mark.parametrize("name", sorted(COMPLAINTS))
def test_complaint_samples_parse(name: str) -> None:
    raw = _raw(name)
    report = parse_report(raw, null_sender=False, to_feedback_loop=_to_fbl(raw))
    feedback_type, user_agent, recipients = COMPLAINTS[name]
    assert report.kind is Kind.COMPLAINT
    assert (report.feedback_type, report.user_agent) == (feedback_type, user_agent)
    assert [r.address for r in report.recipients] == recipients
    assert report.original_message_id == f"corpus-{name[:2]}@mail.postmesh.test"


@pytest.mark.parametrize("name", sorted(NOTHING))
def test_notices_that_are_not_bounces_record_nothing(name: str) -> None:
    report = parse_report(_raw(name))
    assert report.kind is Kind.NONE and NOTHING[name] in report.reason


def test_the_shared_classification_files_what_ses_files_as_transient() -> None:
    assert _pair(classify("5.2.2")) == (T, FULL)
    assert _pair(classify("5.3.4")) == (T, LARGE)
    assert _pair(classify("5.2.3")) == (T, LARGE)
    assert _pair(classify("5.1.1")) == (P, NO_EMAIL)
    assert _pair(classify("5.1.10")) == (P, GENERAL)
    assert _pair(classify("4.4.7")) == (T, GENERAL)
    assert _pair(classify("5.7.1", "554 5.7.1 rejected as spam")) == (T, CONTENT)
    assert _pair(classify("5.7.1", "550 5.7.1 relaying denied")) == (P, GENERAL)
    assert _pair(classify("", "550 Requested action not taken: mailbox unavailable")) == (P, NO_EMAIL)
    assert _pair(classify("", "no code at all")) == (
        ev.BOUNCE_TYPE_UNDETERMINED,
        ev.BOUNCE_SUB_TYPE_UNDETERMINED,
    )


def test_every_sample_through_the_smtp_listener_records_its_events(start_mesh: MeshFactory) -> None:
    """Each sample is mailed to the listener: bounces to a VERP address of a message sent to the
    expected recipients, complaints to the feedback-loop address (mapped by the quoted Message-ID)."""
    mesh: MeshThread = start_mesh(("feedback",), default_bounce_domain="bounces.postmesh.test")
    assert mesh.server is not None
    inbound = mesh.server.services["feedback"].inbound  # type: ignore[attr-defined]
    key = VerpKey.from_settings(mesh.settings)
    account = new_account_id()
    port = inbound_port(mesh)
    for name in [*BOUNCES, *COMPLAINTS, *NOTHING]:
        recipients = list(BOUNCES.get(name, {})) or (
            COMPLAINTS[name][2] if name in COMPLAINTS else ["x@y.test"]
        )
        mail = ev.Mail(
            message_id=f"corpus-{name[:2]}",
            source="news@example.test",
            destination=recipients,
            headers=[ev.Header(name="Message-ID", value=f"<corpus-{name[:2]}@mail.postmesh.test>")],
        )
        mesh.run(inbound.messages.record(account, mail))
        raw = _raw(name)
        if name in COMPLAINTS:
            code, reply = deliver(port, "reports@provider.test", ["fbl@bounces.postmesh.test"], raw)
        else:
            verp = bounce_address(
                mail.message_id, recipients[0] if len(recipients) == 1 else None, "bounces.postmesh.test", key
            )
            code, reply = deliver(port, "", [verp], raw)
        assert code == 250, (name, reply)
        assert (b"Kept" in reply) == (name in NOTHING), (name, reply)
    events = email_events(
        mesh.settings.nats_url,
        account,
        until=lambda es: len({e.email.mail.message_id for e in es}) >= len(BOUNCES) + len(COMPLAINTS),
    )
    by_message: dict[str, list[ev.EmailEvent]] = {}
    for event in events:
        by_message.setdefault(event.email.mail.message_id, []).append(event.email)
    for name, expected in BOUNCES.items():
        got = {
            r.email_address: (e.bounce.bounce_type, e.bounce.bounce_sub_type, r.status)
            for e in by_message[f"corpus-{name[:2]}"]
            for r in e.bounce.bounced_recipients
        }
        assert got == expected, name
    for name, (feedback_type, _, recipients) in COMPLAINTS.items():
        [email] = by_message[f"corpus-{name[:2]}"]
        assert email.event_type == ev.EMAIL_EVENT_TYPE_COMPLAINT
        assert email.complaint.complaint_feedback_type == feedback_type
        assert [r.email_address for r in email.complaint.complained_recipients] == recipients
    assert not set(by_message) & {f"corpus-{n[:2]}" for n in NOTHING}
