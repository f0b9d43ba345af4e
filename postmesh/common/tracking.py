"""Open and click tracking shared by the sender (which writes tracked URLs into messages) and the
feedback service (which answers them): the signed token format, the URLs, and the bucket holding
what each tracked message's events say about it.

A tracking URL is `<base>/o/<token>` (the open pixel) or `<base>/c/<token>` (a link), the token being
`<payload>.<mac>`: the payload a base64url TrackingToken (message id, account, original link, link
tags), the mac a base64url HMAC-SHA256 of the payload under TRACKING_SECRET. The link is inside the
signed payload, so the endpoint never redirects anywhere a message did not link, and a token keeps
working as long as the secret does, whatever happened to the bucket.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
from urllib.parse import urlsplit

from nats.js import JetStreamContext
from nats.js.api import KeyValueConfig, StorageType
from nats.js.errors import KeyNotFoundError
from nats.js.kv import KeyValue

from postmesh.common.config import Setting, register
from postmesh.common.streams import DAY, TRACKING_BUCKET, open_key_value
from postmesh.events.v1 import events_pb2
from postmesh.sender.v1 import tracking_pb2

register(
    Setting(
        "TRACKING_SECRET",
        str,
        "",
        "HMAC key of open and click tracking URLs, the same on every sender and feedback replica; "
        "empty: no tracking.",
        secret=True,
    ),
    Setting(
        "TRACKING_HTTP_LISTEN",
        str,
        "127.0.0.1:8091",
        "Address of feedback's HTTP server for tracked links and the open pixel; empty disables it.",
    ),
    Setting(
        "TRACKING_PUBLIC_URL",
        str,
        "",
        "Base URL of tracked links and pixels as recipients reach it; empty: http://TRACKING_HTTP_LISTEN.",
    ),
    Setting(
        "TRACKING_RETENTION_DAYS",
        float,
        365.0,
        "How long opens and clicks of a message carry its details (recipients, tags, subject).",
    ),
)

OPEN_PATH = "o"
CLICK_PATH = "c"
# A token longer than this is refused before any work (a link is at most a few KiB).
MAX_TOKEN_LENGTH = 16 * 1024


class BadToken(ValueError):
    """Not a token this deployment signed: unknown, truncated or tampered with."""


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    try:
        return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError) as exc:
        raise BadToken("not base64url") from exc


class TokenSigner:
    def __init__(self, secret: str) -> None:
        if not secret:
            raise ValueError("TRACKING_SECRET is empty")
        self._key = hashlib.sha256(b"postmesh-tracking\0" + secret.encode()).digest()

    def _mac(self, payload: str) -> str:
        return _b64(hmac.new(self._key, payload.encode("ascii"), hashlib.sha256).digest())

    def sign(self, token: tracking_pb2.TrackingToken) -> str:
        # Deterministic serialization: a message re-delivered after a retry gets the same URLs.
        payload = _b64(token.SerializeToString(deterministic=True))
        return f"{payload}.{self._mac(payload)}"

    def verify(self, text: str) -> tracking_pb2.TrackingToken:
        if len(text) > MAX_TOKEN_LENGTH or not text.isascii():
            raise BadToken("malformed token")
        payload, dot, mac = text.partition(".")
        if not dot or not hmac.compare_digest(mac, self._mac(payload)):
            raise BadToken("bad signature")
        try:
            return tracking_pb2.TrackingToken.FromString(_unb64(payload))
        except Exception as exc:  # a signed payload always parses; be strict anyway
            raise BadToken("unreadable payload") from exc


def tracking_base(public_url: str, listen: str, custom_redirect_domain: str = "") -> str:
    """Where tracked URLs point: TRACKING_PUBLIC_URL (or the listener), on the custom redirect
    domain's host when the message's configuration set names one (scheme kept)."""
    base = public_url.rstrip("/")
    if not base:
        host, _, port = listen.rpartition(":")
        host = host or "127.0.0.1"
        if host in ("0.0.0.0", "[::]", "::"):
            host = "127.0.0.1"
        base = f"http://{host}:{port}"
    if custom_redirect_domain:
        parts = urlsplit(base)
        base = f"{parts.scheme}://{custom_redirect_domain.strip().rstrip('.').lower()}{parts.path}"
    return base.rstrip("/")


class TrackedMail:
    """The bucket of tracked messages' mail objects (key: message id), opened or created on first use."""

    def __init__(self, js: JetStreamContext, retention_days: float) -> None:
        self._js = js
        self._retention_days = retention_days
        self._bucket: KeyValue | None = None

    async def _kv(self) -> KeyValue:
        if self._bucket is None:
            self._bucket = await open_key_value(
                self._js,
                KeyValueConfig(
                    bucket=TRACKING_BUCKET,
                    description="the mail object of each tracked message, for its open and click events",
                    ttl=self._retention_days * DAY,
                    storage=StorageType.FILE,
                ),
            )
        return self._bucket

    @staticmethod
    def _key(message_id: str) -> str:
        # KV keys allow [-/_=.a-zA-Z0-9]; message ids are hex and dashes, but never trust that.
        return _b64(message_id.encode())

    async def remember(self, mail: events_pb2.Mail) -> None:
        await (await self._kv()).put(self._key(mail.message_id), mail.SerializeToString(deterministic=True))

    async def recall(self, message_id: str) -> events_pb2.Mail | None:
        try:
            entry = await (await self._kv()).get(self._key(message_id))
        except KeyNotFoundError:
            return None
        if entry.value is None:
            return None
        return events_pb2.Mail.FromString(entry.value)
