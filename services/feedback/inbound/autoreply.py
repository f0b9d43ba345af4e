"""RFC 3834 auto-replies (out of office, vacation, challenge/response) that reach a bounce address:
SES files them as Transient/General bounces, never permanent ones."""

from __future__ import annotations

import re
from email.message import Message

from services.feedback.inbound import mimeparts
from services.feedback.inbound.report import Kind, Recipient, Report

_SUBJECT = re.compile(
    r"^(?:auto(?:matic)?[ -]?(?:reply|response|antwort)|out of (?:the )?office|vacation|away from|"
    r"autoreply|auto:|abwesenheit|absence|r[ée]ponse automatique|please confirm|challenge)",
    re.I,
)


def is_auto_reply(message: Message) -> bool:
    submitted = mimeparts.header(message, "Auto-Submitted").lower()
    if submitted and submitted != "no":
        return True
    if mimeparts.header(message, "X-Autoreply") or mimeparts.header(message, "X-Autorespond"):
        return True
    if mimeparts.header(message, "Precedence").lower() == "auto_reply":
        return True
    if mimeparts.header(message, "X-Auto-Response-Suppress") and _SUBJECT.search(
        mimeparts.header(message, "Subject")
    ):
        return True
    return bool(_SUBJECT.search(mimeparts.header(message, "Subject")))


def parse_auto_reply(message: Message) -> Report | None:
    if not is_auto_reply(message):
        return None
    sender = mimeparts.addresses_in(mimeparts.header(message, "From"))
    body = mimeparts.body_text(message)
    return Report(
        kind=Kind.BOUNCE,
        format="auto-reply",
        recipients=[
            Recipient(
                address=sender[0] if sender else "",
                action="failed",
                status="",
                diagnostic_code=mimeparts.header(message, "Subject"),
            )
        ],
        auto_reply=True,
        original_message_id=mimeparts.message_id_in(
            mimeparts.header(message, "In-Reply-To") or mimeparts.header(message, "References")
        )
        or mimeparts.quoted_message_id(message, body),
    )
