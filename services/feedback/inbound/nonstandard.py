"""Bounces without a delivery-status part: the plain-text shapes of Postfix, Exim, Sendmail, qmail,
Exchange/Office 365, Gmail, Yahoo, Lotus Domino and the generic "Undelivered Mail" notices.

Each MTA names the failed address and then says why; the heuristic reads the notice's own text (never
the quoted original, whose headers are full of addresses), takes the addresses the failure is about,
and for each the text that follows it, up to the next one: that is its diagnostic, where the status
code and the words that decide permanent or temporary are found.
"""

from __future__ import annotations

import re
from email.message import Message

from postmesh.common.bounces import find_status
from services.feedback.inbound import mimeparts
from services.feedback.inbound.report import Kind, Recipient, Report

_BOUNCE_FROM = re.compile(
    r"mailer-daemon|postmaster|mail delivery (?:system|subsystem)|mail administrator", re.I
)
_BOUNCE_SUBJECT = re.compile(
    r"undeliver|undelivered|delivery (?:status notification|failure|failed|has failed)|"
    r"mail delivery failed|returned mail|failure notice|could not (?:be )?deliver|non[- ]?delivery|"
    r"delivery problem|not delivered|mail system error|address not found|nondeliverable",
    re.I,
)
_DELAY = re.compile(
    r"delayed mail|delivery delayed|\bdelay(?:ed)?\b.*\b(?:retry|retried|still)|still being retried|"
    r"has not yet been delivered|will (?:continue|keep) (?:to )?(?:try|retry)|warning: message .* delayed",
    re.I,
)
_PERMANENT = re.compile(
    r"permanent(?:ly)?|fatal|couldn'?t be found|could not be found|does not exist|doesn'?t exist|"
    r"not listed|no such|unknown|not delivered|couldn'?t be delivered|could not be delivered|"
    r"giving up|rejected|refused|disabled",
    re.I,
)
_TEMPORARY = re.compile(r"temporar(?:y|ily)|try again later|deferred|over quota|mailbox (?:is )?full", re.I)

_FORMATS = (
    ("qmail", re.compile(r"qmail-send program", re.I)),
    ("postfix", re.compile(r"This is the mail system at host|The mail system\s*\n", re.I)),
    ("exim", re.compile(r"created automatically by mail delivery software", re.I)),
    ("sendmail", re.compile(r"Transcript of session follows|addresses had permanent fatal errors", re.I)),
    (
        "exchange",
        re.compile(
            r"Delivery has failed to these recipients|Your message (?:to .* )?couldn'?t be "
            r"delivered|Diagnostic information for administrators",
            re.I,
        ),
    ),
    (
        "gmail",
        re.compile(
            r"Delivery to the following recipient failed|Google tried to deliver|"
            r"wasn'?t delivered to .* because",
            re.I,
        ),
    ),
    ("yahoo", re.compile(r"unable to deliver your message to the following address", re.I)),
    ("domino", re.compile(r"Domino Directory|was not delivered to:\s", re.I)),
)
# Where an inline copy of the original message starts: its own addresses are not the failed ones.
_ORIGINAL_STARTS = re.compile(
    r"^\s*-*\s*(?:original message|below this line is a copy|this is a copy|returned message|"
    r"forwarded message)|^(?:return-path|received|message-id|from|to|subject|date|original message headers)"
    r"\s*:",
    re.I | re.M,
)
_NOT_RECIPIENTS = re.compile(r"^(?:mailer-daemon|postmaster|noreply|no-reply|bounce\+)", re.I)


def looks_like_bounce(message: Message, null_sender: bool) -> bool:
    subject = mimeparts.header(message, "Subject")
    sender = mimeparts.header(message, "From")
    return (
        bool(_BOUNCE_SUBJECT.search(subject))
        or bool(_BOUNCE_FROM.search(sender))
        or (null_sender and bool(_BOUNCE_SUBJECT.search(subject + " " + sender)))
    )


def _notice_text(message: Message) -> str:
    """The notice's own text: text parts outside any quoted message, and the subject."""
    parts: list[str] = [mimeparts.header(message, "Subject")]
    skip: set[int] = set()
    for part in mimeparts.walk(message):
        if part.get_content_type() in ("message/rfc822", "text/rfc822-headers", "message/rfc822-headers"):
            for inner in mimeparts.walk(part):
                if inner is not part:
                    skip.add(id(inner))
            continue
        if id(part) in skip:
            continue
        if part.get_content_type() == "text/plain" or (
            part.get_content_type() == "text/html" and len(parts) == 1
        ):
            body = mimeparts.text(part)
            if part.get_content_type() == "text/html":
                body = re.sub(r"<[^>]+>", " ", body)
            # Inline copies of the original start at its headers: stop there.
            cut = _ORIGINAL_STARTS.search(body)
            parts.append(body[: cut.start()] if cut else body)
    return "\n".join(parts)


def parse_nonstandard(message: Message, null_sender: bool, own_addresses: set[str]) -> Report | None:
    if not looks_like_bounce(message, null_sender):
        return None
    notice = _notice_text(message)
    fmt = next((name for name, marker in _FORMATS if marker.search(notice)), "generic")
    body = mimeparts.body_text(message)
    report = Report(
        kind=Kind.BOUNCE,
        format=fmt,
        original_message_id=mimeparts.quoted_message_id(message, body),
        original_return_path=mimeparts.quoted_return_path(message, body),
    )
    if _DELAY.search(notice) and not _PERMANENT.search(notice.replace("delivery failed", "")):
        report.kind = Kind.NONE
        report.reason = "a delay notice: the message is still being retried"
        return report
    skip = {a.lower() for a in own_addresses}
    skip |= {a.lower() for a in mimeparts.addresses_in(mimeparts.header(message, "From"))}
    skip |= {a.lower() for a in mimeparts.addresses_in(mimeparts.header(message, "To"))}
    found: list[tuple[int, str]] = []
    for match in re.finditer(r"[^\s<>()\[\]\"',;:]+@[A-Za-z0-9.\-]+[A-Za-z0-9]", notice):
        address = match.group(0).strip(".")
        if address.lower() in skip or _NOT_RECIPIENTS.match(address):
            continue
        if "=" in address.partition("@")[0] and address.lower().startswith("bounce"):
            continue
        found.append((match.start(), address))
    recipients: dict[str, Recipient] = {}
    for index, (start, address) in enumerate(found):
        end = found[index + 1][0] if index + 1 < len(found) else len(notice)
        window = notice[start : min(end, start + 800)]
        # The diagnostic is the text after the address, up to the next one (sometimes before it, in
        # Lotus Domino's and Yahoo's "because:" shapes the reason follows on the next lines anyway).
        key = address.lower()
        diagnostic = re.sub(r"\s+", " ", window[len(address) :]).strip(" :>)")[:500]
        if key in recipients and len(recipients[key].diagnostic_code) >= len(diagnostic):
            continue
        status = find_status(window) or find_status(notice)
        recipients[key] = Recipient(
            address=address,
            status=status or _status_from_words(window, notice),
            diagnostic_code=f"smtp; {diagnostic}" if diagnostic else "",
        )
    report.recipients = list(recipients.values())
    if not report.recipients:
        report.kind = Kind.NONE
        report.reason = f"a {fmt} bounce notice naming no recipient"
    return report


def _status_from_words(window: str, notice: str) -> str:
    reply = re.search(r"(?<![\d.])([45])\d\d(?![\d.])", window)
    if reply:
        return f"{reply.group(1)}.0.0"
    for text in (window, notice):
        if _TEMPORARY.search(text):
            return "4.0.0"
        if re.search(r"not listed|no such|unknown|couldn'?t be found|does not exist|doesn'?t", text, re.I):
            return "5.1.1"
        if _PERMANENT.search(text):
            return "5.0.0"
    return ""
