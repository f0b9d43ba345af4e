"""VERP envelope senders: the bounce address names the message and, when it can, the recipient.

Form: ``bounce+<message id>-<recipient>@<domain>``, where <recipient> is the recipient address's
UTF-8 bytes in RFC 4648 base32, lower case, without padding. Base32 survives any address (quoted
local parts, '+', '-', '=', non-ASCII) and MTAs that change the case of local parts, and its alphabet
has no '-', so the recipient is everything after the last '-' (message ids may contain '-'). A
transaction carrying several recipients cannot name one: its bounce address ends in ``-0`` ('0' is
not a base32 digit), ``bounce+<message id>-0@<domain>``, and the recipient comes from the DSN's
Final-Recipient field instead.
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass

PREFIX = "bounce+"
NO_RECIPIENT = "0"


@dataclass(frozen=True)
class BounceAddress:
    message_id: str
    recipient: str | None


def _encode(recipient: str) -> str:
    return base64.b32encode(recipient.encode("utf-8")).decode("ascii").rstrip("=").lower()


def _decode(text: str) -> str:
    padded = text.upper() + "=" * (-len(text) % 8)
    return base64.b32decode(padded).decode("utf-8")


def bounce_address(message_id: str, recipient: str | None, domain: str) -> str:
    """The envelope sender for `message_id`; `recipient` None when the transaction has several."""
    if not message_id or "@" in message_id or any(c.isspace() for c in message_id):
        raise ValueError(f"message id {message_id!r} cannot be carried in a bounce address")
    tail = NO_RECIPIENT if recipient is None else _encode(recipient)
    return f"{PREFIX}{message_id}-{tail}@{domain}"


def parse_bounce_address(address: str) -> BounceAddress | None:
    """The message (and recipient) a bounce address names, or None when it is not one of ours."""
    local, at, _ = address.strip().strip("<>").rpartition("@")
    if not at or not local.lower().startswith(PREFIX):
        return None
    message_id, dash, tail = local[len(PREFIX) :].rpartition("-")
    if not dash or not message_id or not tail:
        return None
    if tail == NO_RECIPIENT:
        return BounceAddress(message_id=message_id, recipient=None)
    try:
        return BounceAddress(message_id=message_id, recipient=_decode(tail))
    except (binascii.Error, UnicodeDecodeError, ValueError):
        return None
