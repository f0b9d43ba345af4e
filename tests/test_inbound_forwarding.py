"""Which events feedback forwarding turns into a notice, and the notices themselves: never a loop."""

from __future__ import annotations

import datetime as dt
from typing import Any

from postmesh.common.service import SystemClock
from postmesh.events.v1 import events_pb2 as ev
from services.feedback.forwarding import SYSTEM_ACCOUNT_ID, FeedbackForwarder, complaint_notice
from services.feedback.inbound.parsing import parse_report
from services.feedback.inbound.report import Kind


def _forwarder() -> FeedbackForwarder:
    nothing: Any = None
    return FeedbackForwarder(
        js=nothing,
        suppression=nothing,
        clock=SystemClock(),
        sender="MAILER-DAEMON@sys.test",
        own_addresses={"fbl@b.test"},
    )


def _bounce(account: str, forward_to: str, bounced: str = "gone@r.test") -> ev.Event:
    return ev.Event(
        account_id=account,
        email=ev.EmailEvent(
            event_type=ev.EMAIL_EVENT_TYPE_BOUNCE,
            mail=ev.Mail(message_id="m", feedback_forwarding_address=forward_to),
            bounce=ev.Bounce(bounced_recipients=[ev.BouncedRecipient(email_address=bounced)]),
        ),
    )


def test_notices_never_loop() -> None:
    forwarder = _forwarder()
    assert forwarder._target(_bounce("acct1", "ops@example.test")) == "ops@example.test"
    assert forwarder._target(_bounce("acct1", "")) == ""
    assert forwarder._target(_bounce(SYSTEM_ACCOUNT_ID, "ops@example.test")) == ""
    assert forwarder._target(_bounce("acct1", "FBL@b.test")) == ""
    assert forwarder._target(_bounce("acct1", "bounce+m-0-abc@b.test")) == ""
    assert forwarder._target(_bounce("acct1", "mailer-daemon@example.test")) == ""
    assert forwarder._target(_bounce("acct1", "Gone@r.test", bounced="gone@r.test")) == ""


def test_a_complaint_notice_is_an_arf_report_postmesh_reads_back() -> None:
    mail = ev.Mail(message_id="m", headers=[ev.Header(name="Message-ID", value="<m@mail.test>")])
    complaint = ev.Complaint(
        complained_recipients=[ev.ComplainedRecipient(email_address="angry@r.test")],
        complaint_feedback_type="abuse",
    )
    complaint.arrival_date.FromDatetime(dt.datetime(2026, 12, 1, tzinfo=dt.UTC))
    raw = complaint_notice(
        "MAILER-DAEMON@sys.test", "ops@example.test", mail, complaint, dt.datetime.now(dt.UTC)
    )
    report = parse_report(raw, null_sender=False)
    assert report.kind is Kind.COMPLAINT and report.feedback_type == "abuse"
    assert [r.address for r in report.recipients] == ["angry@r.test"]
    assert report.original_message_id == "m@mail.test"
    assert report.arrival_date == dt.datetime(2026, 12, 1, tzinfo=dt.UTC)
