"""RFC 3464 delivery status notifications (multipart/report; report-type=delivery-status)."""

from __future__ import annotations

from email import policy
from email.message import Message
from email.parser import HeaderParser

from services.feedback.inbound import mimeparts
from services.feedback.inbound.report import Kind, Recipient, Report

# Actions that say the recipient did not get the message; "delayed", "delivered", "relayed" and
# "expanded" are not bounces.
FAILED_ACTIONS = {"failed"}


def _field_groups(part: Message) -> list[Message]:
    """The per-message block and the per-recipient blocks of a message/delivery-status part."""
    inner = part.get_payload()
    if isinstance(inner, list) and all(isinstance(p, Message) for p in inner):
        return list(inner)
    raw = mimeparts.text(part).replace("\r\n", "\n")
    blocks = [b for b in raw.split("\n\n") if b.strip()]
    return [HeaderParser(policy=policy.compat32).parsestr(b.strip() + "\n") for b in blocks]


def _typed(value: str) -> str:
    """'rfc822; user@example.com' -> 'user@example.com'."""
    kind, semi, rest = value.partition(";")
    return rest.strip() if semi and " " not in kind.strip() else value.strip()


def status_part(message: Message) -> Message | None:
    for part in mimeparts.walk(message):
        if part.get_content_type() in ("message/delivery-status", "message/global-delivery-status"):
            return part
    return None


def parse_dsn(message: Message) -> Report | None:
    """The report a DSN makes, or None when the message has no delivery-status part."""
    part = status_part(message)
    if part is None:
        return None
    groups = _field_groups(part)
    reporting_mta = ""
    failed: list[Recipient] = []
    others: list[str] = []
    for group in groups:
        if mimeparts.header(group, "Reporting-MTA"):
            reporting_mta = mimeparts.header(group, "Reporting-MTA")
        recipient = _typed(
            mimeparts.header(group, "Final-Recipient") or mimeparts.header(group, "Original-Recipient")
        )
        if not recipient:
            continue
        action = mimeparts.header(group, "Action").lower()
        entry = Recipient(
            address=recipient,
            action=action or "failed",
            status=mimeparts.header(group, "Status").split(" ")[0],
            diagnostic_code=mimeparts.header(group, "Diagnostic-Code"),
            remote_mta=mimeparts.header(group, "Remote-MTA"),
        )
        if entry.action in FAILED_ACTIONS or (not action and entry.status.startswith("5")):
            failed.append(entry)
        else:
            others.append(entry.action)
    body = mimeparts.body_text(message)
    report = Report(
        kind=Kind.BOUNCE if failed else Kind.NONE,
        format="dsn",
        recipients=failed,
        reporting_mta=reporting_mta,
        original_message_id=mimeparts.quoted_message_id(message, body),
        original_return_path=mimeparts.quoted_return_path(message, body),
    )
    if not failed:
        report.reason = (
            f"delivery status notification without a failed recipient ({', '.join(sorted(set(others)))})"
            if others
            else "delivery status notification without recipients"
        )
    return report
