"""SES's bounce types and subtypes from an SMTP status: one pure function, used for replies the
delivery workers get during the SMTP session and for DSNs that arrive later.

SES files full mailboxes and oversized or rejected content as Transient (the same address may take
mail tomorrow) and keeps Permanent for addresses that do not work; only Permanent bounces suppress.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from postmesh.events.v1 import events_pb2 as ev

_STATUS = re.compile(r"(?<![\d.])([245])\.(\d{1,3})\.(\d{1,3})(?![\d.])")
_REPLY = re.compile(r"(?<!\d)([245])\d\d(?:[ -]|$)")

_NO_EMAIL = {"5.1.1", "5.1.0", "5.1.6"}
_MAILBOX_FULL = {"2.2"}
_TOO_LARGE = {"2.3", "3.4"}
_CONTENT = {"6.0", "6.1", "6.3", "7.0", "7.1"}

_ATTACHMENT_WORDS = re.compile(r"attachment|virus|malware|infected|file type|extension", re.I)
_CONTENT_WORDS = re.compile(
    r"spam|content|message (?:was )?rejected|policy|blocked|blacklist|blocklist", re.I
)
_FULL_WORDS = re.compile(
    r"mailbox (?:is )?full|over ?quota|quota exceeded|insufficient (?:disk )?space", re.I
)
_SIZE_WORDS = re.compile(r"too (?:large|big)|size limit|exceeds? .*size|message size", re.I)
_UNKNOWN_WORDS = re.compile(
    r"user unknown|unknown user|no such (?:user|mailbox|recipient)|does not exist|doesn'?t exist|"
    r"not exist|mailbox unavailable|invalid (?:recipient|mailbox|address)|recipient rejected|"
    r"address rejected|not found|no mailbox|account (?:has been )?disabled|"
    r"doesn'?t have an? [\w.-]+ account|not listed",
    re.I,
)


@dataclass(frozen=True)
class Classification:
    bounce_type: ev.BounceType.ValueType
    bounce_sub_type: ev.BounceSubType.ValueType

    @property
    def permanent(self) -> bool:
        return self.bounce_type == ev.BOUNCE_TYPE_PERMANENT


def find_status(text: str) -> str:
    """The first enhanced status code (RFC 3463) in a reply or diagnostic, else ''."""
    match = _STATUS.search(text or "")
    return ".".join(match.groups()) if match else ""


def _class_from_reply(text: str) -> str:
    match = _REPLY.search(text or "")
    return match.group(1) if match else ""


def classify(status: str, diagnostic: str = "") -> Classification:
    """SES's (type, subtype) for a recipient's status (e.g. '5.2.2') and diagnostic text."""
    status = (status or "").strip() or find_status(diagnostic)
    klass, _, detail = status.partition(".")
    if klass not in ("4", "5"):
        klass = _class_from_reply(diagnostic) or klass
    if klass not in ("4", "5"):
        return Classification(ev.BOUNCE_TYPE_UNDETERMINED, ev.BOUNCE_SUB_TYPE_UNDETERMINED)
    text = diagnostic or ""
    transient = ev.BOUNCE_TYPE_TRANSIENT
    if detail in _MAILBOX_FULL or _FULL_WORDS.search(text):
        return Classification(transient, ev.BOUNCE_SUB_TYPE_MAILBOX_FULL)
    if detail in _TOO_LARGE or _SIZE_WORDS.search(text):
        return Classification(transient, ev.BOUNCE_SUB_TYPE_MESSAGE_TOO_LARGE)
    if klass == "4":
        return Classification(transient, ev.BOUNCE_SUB_TYPE_GENERAL)
    if status in _NO_EMAIL:
        return Classification(ev.BOUNCE_TYPE_PERMANENT, ev.BOUNCE_SUB_TYPE_NO_EMAIL)
    if _UNKNOWN_WORDS.search(text) and detail in ("", "0.0", "1.0", "1.1"):
        return Classification(ev.BOUNCE_TYPE_PERMANENT, ev.BOUNCE_SUB_TYPE_NO_EMAIL)
    if detail in _CONTENT or detail.startswith("6."):
        if _ATTACHMENT_WORDS.search(text):
            return Classification(transient, ev.BOUNCE_SUB_TYPE_ATTACHMENT_REJECTED)
        if detail.startswith("6.") or _CONTENT_WORDS.search(text):
            return Classification(transient, ev.BOUNCE_SUB_TYPE_CONTENT_REJECTED)
    return Classification(ev.BOUNCE_TYPE_PERMANENT, ev.BOUNCE_SUB_TYPE_GENERAL)
