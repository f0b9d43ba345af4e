"""Feedback forwarding, as SES does it for a send that gave a FeedbackForwardingEmailAddress: every
bounce and complaint about the message is mailed there, as a DSN (RFC 3464) or an ARF report (RFC
5965) built from the event, queued on the outbound work queue like any message.

Mail postmesh sends on its own behalf goes out under the system account, so a notice that bounces
counts against no customer; and no notice is ever sent about a notice (the system account's own
events are skipped), to a suppressed address, or to an address of postmesh's own (a bounce or
feedback-loop address): nothing here can loop.
"""

from __future__ import annotations

import datetime as dt
import logging
import uuid
from email.utils import format_datetime, make_msgid

from nats.js import JetStreamContext

from postmesh.common.addresses import address_key, domain_of
from postmesh.common.config import Settings
from postmesh.common.outbound import enqueue
from postmesh.common.protoutil import from_timestamp, timestamp
from postmesh.common.service import Clock
from postmesh.common.verp import looks_like_bounce_address
from postmesh.events.v1 import events_pb2 as ev
from postmesh.sender.v1 import queue_pb2
from services.feedback.suppression import SuppressionList

log = logging.getLogger(__name__)

# Owns the system sending identity (see services.identity.accounts).
SYSTEM_ACCOUNT_ID = "000000000000"
NOTICE_TTL = dt.timedelta(days=1)


def notice_sender(settings: Settings) -> str:
    """Notices come from the system identity's domain, so the delivery workers DKIM-sign them."""
    return str(settings.feedback_notice_from or f"MAILER-DAEMON@{domain_of(settings.verification_mail_from)}")


def _type_name(value: int) -> str:
    return ev.BounceType.Name(value).removeprefix("BOUNCE_TYPE_").title()  # type: ignore[arg-type]


def _original_headers(mail: ev.Mail) -> str:
    return "".join(f"{h.name}: {h.value}\n" for h in mail.headers) or f"Message-ID: <{mail.message_id}>\n"


def _report(
    *, sender: str, to: str, subject: str, now: dt.datetime, kind: str, text: str, fields: str, mail: ev.Mail
) -> bytes:
    """A multipart/report: the human-readable part, the machine-readable one, the original's headers."""
    boundary = f"=_postmesh_{uuid.uuid4().hex}"
    report_part = "delivery-status" if kind == "delivery-status" else "feedback-report"
    head = (
        f"From: {sender}\nTo: {to}\nSubject: {subject}\nDate: {format_datetime(now)}\n"
        f"Message-ID: {make_msgid(domain=domain_of(sender))}\nAuto-Submitted: auto-replied\n"
        "MIME-Version: 1.0\n"
        f'Content-Type: multipart/report; report-type={kind}; boundary="{boundary}"\n\n'
    )
    body = (
        f"--{boundary}\nContent-Type: text/plain; charset=utf-8\n\n{text}\n"
        f"--{boundary}\nContent-Type: message/{report_part}\n\n{fields}\n"
        f"--{boundary}\nContent-Type: text/rfc822-headers\n\n{_original_headers(mail)}\n"
        f"--{boundary}--\n"
    )
    return (head + body).replace("\n", "\r\n").encode("utf-8")


def bounce_notice(sender: str, to: str, mail: ev.Mail, bounce: ev.Bounce, now: dt.datetime) -> bytes:
    failed = "\n".join(
        f"  {r.email_address}: {r.diagnostic_code or r.status}" for r in bounce.bounced_recipients
    )
    fields = [f"Reporting-MTA: {bounce.reporting_mta or 'dns; postmesh'}\n"]
    default_status = "5.0.0" if bounce.bounce_type == ev.BOUNCE_TYPE_PERMANENT else "4.0.0"
    for r in bounce.bounced_recipients:
        fields.append(
            f"\nFinal-Recipient: rfc822; {r.email_address}\nAction: {r.action or 'failed'}\n"
            f"Status: {r.status or default_status}\n"
            + (f"Diagnostic-Code: {_one_line(r.diagnostic_code)}\n" if r.diagnostic_code else "")
        )
    return _report(
        sender=sender,
        to=to,
        subject="Delivery Status Notification (Failure)",
        now=now,
        kind="delivery-status",
        text=f"postmesh could not deliver message {mail.message_id} to:\n\n{failed}\n\n"
        f"Bounce type: {_type_name(bounce.bounce_type)}\n",
        fields="".join(fields),
        mail=mail,
    )


def complaint_notice(sender: str, to: str, mail: ev.Mail, complaint: ev.Complaint, now: dt.datetime) -> bytes:
    who = ", ".join(r.email_address for r in complaint.complained_recipients)
    arrival = from_timestamp(complaint.arrival_date) if complaint.HasField("arrival_date") else None
    fields = (
        f"Feedback-Type: {complaint.complaint_feedback_type or 'abuse'}\nUser-Agent: postmesh\nVersion: 1\n"
        + "".join(f"Original-Rcpt-To: {r.email_address}\n" for r in complaint.complained_recipients)
        + (f"Arrival-Date: {format_datetime(arrival)}\n" if arrival else "")
    )
    return _report(
        sender=sender,
        to=to,
        subject="Complaint about your message",
        now=now,
        kind="feedback-report",
        text=f"A recipient complained about message {mail.message_id}: {who}\n",
        fields=fields,
        mail=mail,
    )


def _one_line(value: str) -> str:
    return " ".join(value.split())


class FeedbackForwarder:
    def __init__(
        self,
        *,
        js: JetStreamContext,
        suppression: SuppressionList,
        clock: Clock,
        sender: str,
        own_addresses: set[str],
    ) -> None:
        self._js = js
        self._suppression = suppression
        self._clock = clock
        self._sender = sender
        self._own = {a.lower() for a in own_addresses}

    def _target(self, event: ev.Event) -> str:
        email = event.email
        to = email.mail.feedback_forwarding_address.strip()
        if not to or event.account_id == SYSTEM_ACCOUNT_ID:
            return ""
        if (
            to.lower() in self._own
            or looks_like_bounce_address(to)
            or to.lower().startswith("mailer-daemon@")
        ):
            return ""
        if email.event_type == ev.EMAIL_EVENT_TYPE_BOUNCE:
            # The address the message bounced from is not where its notice goes.
            if any(address_key(to) == address_key(r.email_address) for r in email.bounce.bounced_recipients):
                return ""
        return to

    async def handle(self, event: ev.Event) -> None:
        if event.WhichOneof("payload") != "email":
            return
        email = event.email
        if email.event_type not in (ev.EMAIL_EVENT_TYPE_BOUNCE, ev.EMAIL_EVENT_TYPE_COMPLAINT):
            return
        to = self._target(event)
        if not to or await self._suppression.check(event.account_id, [to]):
            return
        now = self._clock.now()
        if email.event_type == ev.EMAIL_EVENT_TYPE_BOUNCE:
            notice = bounce_notice(self._sender, to, email.mail, email.bounce, now)
            subject = "Delivery Status Notification (Failure)"
        else:
            notice = complaint_notice(self._sender, to, email.mail, email.complaint, now)
            subject = "Complaint about your message"
        queued = queue_pb2.QueuedMessage(
            # From the event id: a redelivered event queues the same notice, de-duplicated by JetStream.
            message_id=uuid.uuid5(uuid.NAMESPACE_URL, f"postmesh-forward:{event.event_id}").hex,
            account_id=SYSTEM_ACCOUNT_ID,
            from_address=self._sender,
            from_identity=domain_of(self._sender),
            identity_owner_account_id=SYSTEM_ACCOUNT_ID,
            recipients=[to],
            mime=notice,
            accepted_time=timestamp(now),
            expire_time=timestamp(now + NOTICE_TTL),
            tls_policy=queue_pb2.TLS_POLICY_OPTIONAL,
            subject=subject,
        )
        await enqueue(self._js, queued)
        log.info("feedback forwarded", extra={"account_id": event.account_id, "event_id": event.event_id})
