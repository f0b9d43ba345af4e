"""VERP envelope senders: the bounce address names the message and, when it can, the recipient, and
carries a tag that proves postmesh made it.

Form: ``bounce+<message id>-<recipient>-<tag>@<domain>``, where <recipient> is the recipient
address's UTF-8 bytes in RFC 4648 base32, lower case, without padding. Base32 survives any address
(quoted local parts, '+', '-', '=', non-ASCII) and MTAs that change the case of local parts, and its
alphabet has no '-', so the tag and the recipient are the last two '-'-separated parts (message ids
may contain '-'). A transaction carrying several recipients cannot name one: its recipient part is
``0`` ('0' is not a base32 digit), and the recipient comes from the DSN's Final-Recipient field.

<tag> is an HMAC-SHA256 (truncated to 80 bits, base32) of the lower-cased message id and recipient
part under VERP_SECRET, which every sender and feedback replica shares. Anyone can mail the bounce
domain; without the tag a forged DSN naming another account's message id could suppress that
account's recipients or spoil its bounce rate. Addresses without a valid tag (the untagged form of
earlier versions included) map to nothing.
"""

from __future__ import annotations

import base64
import binascii
import hmac
from dataclasses import dataclass

from postmesh.common.config import Setting, Settings

PREFIX = "bounce+"
NO_RECIPIENT = "0"
_TAG_BYTES = 10

# Registered by each service that writes or reads bounce addresses (sender, feedback).
DEFAULT_BOUNCE_DOMAIN = Setting(
    "DEFAULT_BOUNCE_DOMAIN",
    str,
    "bounces.localhost",
    "Domain of the VERP envelope sender when the account has no custom MAIL FROM domain.",
)
# Registered by each service that writes or reads bounce addresses (sender, feedback).
VERP_SECRET = Setting(
    "VERP_SECRET",
    str,
    "",
    "Key of the integrity tag in VERP bounce addresses; same on every replica. Empty: SERVICE_API_KEY.",
    secret=True,
)


@dataclass(frozen=True)
class BounceAddress:
    message_id: str
    recipient: str | None


@dataclass(frozen=True)
class VerpKey:
    secret: bytes

    @classmethod
    def from_settings(cls, settings: Settings) -> VerpKey:
        secret = settings.verp_secret or settings.service_api_key
        if not secret:
            raise ValueError(
                "VERP_SECRET is not set: bounce addresses need a key shared by every sender and feedback "
                "replica (`postmesh dev` makes one in DATA_DIR by itself)."
            )
        return cls(secret.encode("utf-8"))

    def tag(self, message_id: str, tail: str) -> str:
        digest = hmac.digest(self.secret, f"{message_id}-{tail}".lower().encode("utf-8"), "sha256")
        return base64.b32encode(digest[:_TAG_BYTES]).decode("ascii").lower()


def _encode(recipient: str) -> str:
    return base64.b32encode(recipient.encode("utf-8")).decode("ascii").rstrip("=").lower()


def _decode(text: str) -> str:
    padded = text.upper() + "=" * (-len(text) % 8)
    return base64.b32decode(padded).decode("utf-8")


def bounce_address(message_id: str, recipient: str | None, domain: str, key: VerpKey) -> str:
    """The envelope sender for `message_id`; `recipient` None when the transaction has several."""
    if not message_id or "@" in message_id or any(c.isspace() for c in message_id):
        raise ValueError(f"message id {message_id!r} cannot be carried in a bounce address")
    tail = NO_RECIPIENT if recipient is None else _encode(recipient)
    return f"{PREFIX}{message_id}-{tail}-{key.tag(message_id, tail)}@{domain}"


def looks_like_bounce_address(address: str) -> bool:
    """Whether the address has the shape of a bounce address (its tag unchecked)."""
    local = address.strip().strip("<>").rpartition("@")[0]
    return local.lower().startswith(PREFIX)


def parse_bounce_address(address: str, key: VerpKey) -> BounceAddress | None:
    """The message (and recipient) a bounce address names, or None when it is not one of ours: not
    the shape, or a tag that does not match (forged or tampered)."""
    local, at, _ = address.strip().strip("<>").rpartition("@")
    if not at or not local.lower().startswith(PREFIX):
        return None
    rest, dash, tag = local[len(PREFIX) :].rpartition("-")
    if not dash:
        return None
    message_id, dash, tail = rest.rpartition("-")
    if not dash or not message_id or not tail:
        return None
    if not hmac.compare_digest(tag.lower().encode(), key.tag(message_id, tail).encode()):
        return None
    if tail == NO_RECIPIENT:
        return BounceAddress(message_id=message_id, recipient=None)
    try:
        return BounceAddress(message_id=message_id, recipient=_decode(tail))
    except (binascii.Error, UnicodeDecodeError, ValueError):
        return None
