"""Webhook signing secrets: made once, shown once, kept sealed; and the signature over each request.

The signature header is `X-Postmesh-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256>`, the HMAC keyed
with the destination's secret over `<t>.<body>`. A receiver recomputes it, compares in constant time
and refuses a `t` too far from its own clock (replays).

Secrets are sealed with AES-256-GCM under the service's secrets key (WEBHOOK_SECRETS_KEY, or a key file
in DATA_DIR), bound to the account as authenticated data, because signing needs the secret itself:
a hash would not do.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
import secrets
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

SIGNATURE_HEADER = "X-Postmesh-Signature"
SECRET_PREFIX = "whsec_"
_NONCE = 12


class SecretsKeyError(ValueError):
    """WEBHOOK_SECRETS_KEY is malformed."""


def new_secret() -> str:
    return SECRET_PREFIX + secrets.token_urlsafe(32)


def signature(secret: str, timestamp: int, body: bytes) -> str:
    return hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()


def signature_header(secret: str, timestamp: int, body: bytes) -> str:
    return f"t={timestamp},v1={signature(secret, timestamp, body)}"


def verify(secret: str, header: str, body: bytes, *, now: int, tolerance: int = 300) -> bool:
    """What a receiver does (also `postmesh webhook test` and the tests)."""
    fields = dict(part.split("=", 1) for part in header.split(",") if "=" in part)
    try:
        timestamp = int(fields.get("t", ""))
    except ValueError:
        return False
    if abs(now - timestamp) > tolerance:
        return False
    return hmac.compare_digest(fields.get("v1", ""), signature(secret, timestamp, body))


class SecretBox:
    def __init__(self, key: bytes) -> None:
        if len(key) != 32:
            raise SecretsKeyError("WEBHOOK_SECRETS_KEY must be 32 bytes, base64-encoded.")
        self._aead = AESGCM(key)

    @classmethod
    def from_setting(cls, value: str, data_dir: Path) -> SecretBox:
        """The configured key, or the one kept in DATA_DIR (made on first use)."""
        if value:
            try:
                return cls(base64.b64decode(value, validate=True))
            except binascii.Error:
                raise SecretsKeyError("WEBHOOK_SECRETS_KEY is not valid base64.") from None
        path = data_dir / "webhook-secrets.key"
        if not path.exists():
            data_dir.mkdir(parents=True, exist_ok=True)
            descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(descriptor, "w") as file:
                file.write(base64.b64encode(AESGCM.generate_key(bit_length=256)).decode())
        return cls(base64.b64decode(path.read_text().strip()))

    def seal(self, account_id: str, secret: str) -> bytes:
        nonce = os.urandom(_NONCE)
        return nonce + self._aead.encrypt(nonce, secret.encode(), account_id.encode())

    def open(self, account_id: str, sealed: bytes) -> str:
        try:
            return self._aead.decrypt(sealed[:_NONCE], sealed[_NONCE:], account_id.encode()).decode()
        except InvalidTag:
            raise SecretsKeyError("a webhook secret does not open with the configured key") from None
