"""Reading hostile MIME: parts by type, headers of a quoted original message, text of a body. The
standard library's parser never raises on malformed input with policy.compat32; what it cannot read
comes back empty."""

from __future__ import annotations

import re
from collections.abc import Iterator
from email import policy
from email.message import Message
from email.parser import BytesParser, HeaderParser

_MESSAGE_ID = re.compile(r"<([^<>\s]+)>")
_ADDRESS = re.compile(r"[^\s<>()\[\]\"',;:]+@[A-Za-z0-9.\-\[\]]+[A-Za-z0-9\]]")


def parse(raw: bytes) -> Message:
    return BytesParser(policy=policy.compat32).parsebytes(raw)


def walk(message: Message) -> Iterator[Message]:
    try:
        yield from message.walk()
    except Exception:
        return


def header(message: Message, name: str) -> str:
    try:
        value = message.get(name)
    except Exception:
        return ""
    if value is None:
        return ""
    return re.sub(r"\s+", " ", str(value)).strip()


def payload_bytes(part: Message) -> bytes:
    try:
        data = part.get_payload(decode=True)
    except Exception:
        return b""
    if isinstance(data, bytes):
        return data
    inner = part.get_payload()
    if isinstance(inner, list):
        return b"\n".join(_as_bytes(p) for p in inner if isinstance(p, Message))
    if isinstance(inner, str):
        return inner.encode("utf-8", "replace")
    return b""


def _as_bytes(message: Message) -> bytes:
    try:
        return message.as_bytes(policy=policy.compat32)
    except Exception:
        return b""


def text(part: Message) -> str:
    data = payload_bytes(part)
    charset = "utf-8"
    try:
        charset = part.get_content_charset() or "utf-8"
        return data.decode(charset, "replace")
    except (LookupError, Exception):
        return data.decode("utf-8", "replace")


def body_text(message: Message) -> str:
    """All text/plain (else text/html, tags stripped) of a message, joined."""
    plain: list[str] = []
    html: list[str] = []
    for part in walk(message):
        ctype = part.get_content_type()
        if ctype == "text/plain":
            plain.append(text(part))
        elif ctype == "text/html":
            html.append(re.sub(r"<[^>]+>", " ", text(part)))
    return "\n".join(plain or html)


def original_headers(message: Message) -> Message | None:
    """The headers of the original message a report quotes: a message/rfc822 part, a
    text/rfc822-headers part, or (plain forwarded reports) headers found in the body."""
    for part in walk(message):
        ctype = part.get_content_type()
        if ctype in ("message/rfc822", "message/rfc822-headers", "text/rfc822-headers"):
            inner = part.get_payload()
            if isinstance(inner, list) and inner and isinstance(inner[0], Message):
                return inner[0]
            return HeaderParser(policy=policy.compat32).parsestr(text(part).lstrip())
    return None


def message_id_in(value: str) -> str:
    match = _MESSAGE_ID.search(value or "")
    return match.group(1) if match else ""


def quoted_message_id(message: Message, body: str) -> str:
    """The original Message-ID a report quotes, from its original-headers part or its text."""
    original = original_headers(message)
    if original is not None:
        found = message_id_in(header(original, "Message-ID"))
        if found:
            return found
    match = re.search(r"^\s*>?\s*Message-ID:\s*(<[^<>\s]+>)", body, re.I | re.M)
    return message_id_in(match.group(1)) if match else ""


def quoted_return_path(message: Message, body: str) -> str:
    original = original_headers(message)
    if original is not None:
        value = header(original, "Return-Path")
        if value:
            return value.strip("<> ")
    match = re.search(r"^\s*>?\s*Return-Path:\s*<?([^<>\s]+@[^<>\s]+)>?", body, re.I | re.M)
    return match.group(1) if match else ""


def addresses_in(value: str) -> list[str]:
    return [a.strip(".") for a in _ADDRESS.findall(value or "")]
