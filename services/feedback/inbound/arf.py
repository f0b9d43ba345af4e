"""Complaints: ARF reports (RFC 5965 multipart/report; report-type=feedback-report) and the plain
forwarded complaints of providers without ARF."""

from __future__ import annotations

import datetime as dt
import email.utils
import re
from email import policy
from email.message import Message
from email.parser import HeaderParser

from services.feedback.inbound import mimeparts
from services.feedback.inbound.report import Kind, Recipient, Report

FEEDBACK_TYPES = {"abuse", "fraud", "virus", "other", "not-spam", "auth-failure"}


def _date(value: str) -> dt.datetime | None:
    if not value:
        return None
    try:
        parsed = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=dt.UTC)
    return parsed.astimezone(dt.UTC)


def _feedback_part(message: Message) -> Message | None:
    for part in mimeparts.walk(message):
        if part.get_content_type() == "message/feedback-report":
            return part
    return None


def _fields(part: Message) -> Message:
    inner = part.get_payload()
    if isinstance(inner, list) and inner and isinstance(inner[0], Message):
        return inner[0]
    return HeaderParser(policy=policy.compat32).parsestr(mimeparts.text(part).lstrip())


def parse_arf(message: Message) -> Report | None:
    part = _feedback_part(message)
    if part is None:
        return None
    fields = _fields(part)
    feedback_type = mimeparts.header(fields, "Feedback-Type").lower()
    if feedback_type not in FEEDBACK_TYPES:
        feedback_type = "other" if feedback_type else "abuse"
    body = mimeparts.body_text(message)
    original = mimeparts.original_headers(message)
    recipients = [a for value in _all(fields, "Original-Rcpt-To") for a in mimeparts.addresses_in(value)]
    if not recipients and original is not None:
        # Providers redact the recipient at times; the quoted To is the best left.
        recipients = mimeparts.addresses_in(mimeparts.header(original, "To"))
    return Report(
        kind=Kind.COMPLAINT,
        format="arf",
        recipients=[Recipient(address=a, action="complained") for a in dict.fromkeys(recipients)],
        feedback_type=feedback_type,
        user_agent=mimeparts.header(fields, "User-Agent"),
        arrival_date=_date(
            mimeparts.header(fields, "Arrival-Date") or mimeparts.header(fields, "Received-Date")
        ),
        reporting_mta=mimeparts.header(fields, "Reporting-MTA"),
        original_message_id=mimeparts.quoted_message_id(message, body),
        original_return_path=mimeparts.header(fields, "Original-Mail-From").strip("<> ")
        or mimeparts.quoted_return_path(message, body),
    )


def _all(fields: Message, name: str) -> list[str]:
    try:
        return [str(v) for v in fields.get_all(name) or []]
    except Exception:
        return []


_FORWARDED = re.compile(r"\b(?:spam|abuse|complaint|unsolicited|junk)\b", re.I)


def parse_forwarded_complaint(message: Message, to_feedback_loop: bool) -> Report | None:
    """A complaint forwarded as plain mail (an attached or inline copy) to the feedback-loop address."""
    if not to_feedback_loop:
        return None
    body = mimeparts.body_text(message)
    subject = mimeparts.header(message, "Subject")
    message_id = mimeparts.quoted_message_id(message, body)
    if not message_id or not (_FORWARDED.search(subject) or _FORWARDED.search(body)):
        return None
    original = mimeparts.original_headers(message)
    recipients: list[str] = []
    if original is not None:
        recipients = mimeparts.addresses_in(mimeparts.header(original, "To"))
    else:
        match = re.search(r"^\s*>?\s*To:\s*(.+)$", body, re.I | re.M)
        recipients = mimeparts.addresses_in(match.group(1)) if match else []
    return Report(
        kind=Kind.COMPLAINT,
        format="forwarded-complaint",
        recipients=[Recipient(address=a, action="complained") for a in dict.fromkeys(recipients)],
        feedback_type="abuse",
        user_agent=mimeparts.header(message, "X-Mailer") or mimeparts.header(message, "User-Agent"),
        arrival_date=_date(mimeparts.header(message, "Date")),
        original_message_id=message_id,
        original_return_path=mimeparts.quoted_return_path(message, body),
    )
