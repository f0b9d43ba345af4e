"""DKIM key material: generation, BYODKIM validation, DNS record values, and envelope encryption.

Each private key is encrypted (AES-256-GCM) under its own random data key; the data key is encrypted
under a master key from configuration. Rotating the master key re-encrypts only the data keys.
"""

from __future__ import annotations

import base64
import binascii
import secrets
from dataclasses import dataclass

from cryptography.exceptions import InvalidTag, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from postmesh.common.errors import FailedPrecondition, InvalidArgument

RSA = "rsa-sha256"
ED25519 = "ed25519-sha256"
MIN_RSA_BITS = 1024
_NONCE = 12


class MasterKeyError(ValueError):
    """DKIM_MASTER_KEYS is missing or malformed."""


@dataclass(frozen=True)
class KeyMaterial:
    algorithm: str
    key_bits: int
    private_pem: str  # PKCS#8
    public_key: str  # base64, as the p= tag carries it


@dataclass(frozen=True)
class Sealed:
    encrypted_private_key: bytes
    wrapped_data_key: bytes
    master_key_id: str


class MasterKeys:
    """The configured master keys; the first is the one new data keys are encrypted under."""

    def __init__(self, keys: list[tuple[str, bytes]]) -> None:
        if not keys:
            raise MasterKeyError(
                "DKIM_MASTER_KEYS is not set: the identity service needs a master key to encrypt DKIM "
                "private keys. Generate one with `postmesh identity new-master-key` and set "
                "DKIM_MASTER_KEYS=<id>:<key> (`postmesh dev` makes one in DATA_DIR by itself)."
            )
        self._keys = dict(keys)
        self.current_id = keys[0][0]

    @classmethod
    def parse(cls, value: str) -> MasterKeys:
        keys: list[tuple[str, bytes]] = []
        for item in filter(None, (part.strip() for part in value.split(","))):
            key_id, sep, encoded = item.partition(":")
            try:
                raw = base64.urlsafe_b64decode(encoded + "=" * (-len(encoded) % 4))
            except (binascii.Error, ValueError):
                raw = b""
            if not sep or not key_id or len(key_id) > 64 or len(raw) != 32:
                raise MasterKeyError(
                    f"DKIM_MASTER_KEYS: {key_id or item[:8]!r} is not 'id:base64(32 bytes)'."
                )
            keys.append((key_id, raw))
        return cls(keys)

    @staticmethod
    def generate(key_id: str | None = None) -> str:
        """A new `id:key` entry for DKIM_MASTER_KEYS."""
        key_id = key_id or f"mk{secrets.token_hex(4)}"
        return f"{key_id}:{base64.urlsafe_b64encode(secrets.token_bytes(32)).decode().rstrip('=')}"

    def knows(self, key_id: str) -> bool:
        return key_id in self._keys

    def _key(self, key_id: str) -> bytes:
        try:
            return self._keys[key_id]
        except KeyError:
            raise FailedPrecondition(
                f"DKIM key material is encrypted under master key {key_id!r}, which is not configured.",
                reason="MASTER_KEY_UNAVAILABLE",
            ) from None

    def seal(self, key_id: str, private_pem: str) -> Sealed:
        data_key = AESGCM.generate_key(bit_length=256)
        nonce = secrets.token_bytes(_NONCE)
        ciphertext = nonce + AESGCM(data_key).encrypt(nonce, private_pem.encode(), _aad(key_id))
        return Sealed(ciphertext, self._wrap(key_id, data_key, self.current_id), self.current_id)

    def open(self, key_id: str, sealed: Sealed) -> str:
        data_key = self._unwrap(key_id, sealed.wrapped_data_key, sealed.master_key_id)
        blob = sealed.encrypted_private_key
        return AESGCM(data_key).decrypt(blob[:_NONCE], blob[_NONCE:], _aad(key_id)).decode()

    def rewrap(self, key_id: str, wrapped: bytes, master_key_id: str) -> bytes:
        """The same data key, encrypted under the current master key."""
        return self._wrap(key_id, self._unwrap(key_id, wrapped, master_key_id), self.current_id)

    def _wrap(self, key_id: str, data_key: bytes, master_key_id: str) -> bytes:
        nonce = secrets.token_bytes(_NONCE)
        return nonce + AESGCM(self._key(master_key_id)).encrypt(nonce, data_key, _aad(key_id, wrap=True))

    def _unwrap(self, key_id: str, wrapped: bytes, master_key_id: str) -> bytes:
        try:
            return AESGCM(self._key(master_key_id)).decrypt(
                wrapped[:_NONCE], wrapped[_NONCE:], _aad(key_id, wrap=True)
            )
        except InvalidTag:
            raise FailedPrecondition(
                f"Master key {master_key_id!r} does not decrypt DKIM key {key_id}: the configured key "
                "differs from the one it was encrypted with.",
                reason="MASTER_KEY_MISMATCH",
            ) from None


def _aad(key_id: str, *, wrap: bool = False) -> bytes:
    # Binds each ciphertext to its row, so swapping blobs between keys fails to decrypt.
    return f"postmesh-dkim:{'data-key' if wrap else 'private-key'}:{key_id}".encode()


def _pem(key: rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey) -> str:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()


def _material(key: rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey) -> KeyMaterial:
    if isinstance(key, rsa.RSAPrivateKey):
        public = key.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        return KeyMaterial(RSA, key.key_size, _pem(key), base64.b64encode(public).decode())
    raw = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return KeyMaterial(ED25519, 256, _pem(key), base64.b64encode(raw).decode())


def generate(algorithm: str, bits: int = 2048) -> KeyMaterial:
    if algorithm == ED25519:
        return _material(ed25519.Ed25519PrivateKey.generate())
    return _material(rsa.generate_private_key(public_exponent=65537, key_size=bits))


def import_private_key(text: str, *, field: str = "domain_signing_private_key") -> KeyMaterial:
    """A BYODKIM key given as PEM or base64 DER: RSA of at least 1024 bits, or ed25519."""
    data = text.strip().encode()
    if not data:
        raise InvalidArgument("A private key is required.", field=field)
    try:
        if data.startswith(b"-----BEGIN"):
            key = serialization.load_pem_private_key(data, password=None)
        else:
            der = base64.b64decode(b"".join(data.split()), validate=True)
            if len(der) == 32:  # a bare ed25519 seed, as dkimpy's tools write it
                key = ed25519.Ed25519PrivateKey.from_private_bytes(der)
            else:
                key = serialization.load_der_private_key(der, password=None)
    except (ValueError, TypeError, binascii.Error, UnsupportedAlgorithm):
        raise InvalidArgument(
            "domain_signing_private_key is not a valid unencrypted RSA or ed25519 private key "
            "(PEM, or base64-encoded DER).",
            field=field,
        ) from None
    if isinstance(key, rsa.RSAPrivateKey):
        if key.key_size < MIN_RSA_BITS:
            raise InvalidArgument(
                f"The RSA key has {key.key_size} bits; DKIM keys need at least {MIN_RSA_BITS}.", field=field
            )
        return _material(key)
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return _material(key)
    raise InvalidArgument("DKIM keys must be RSA or ed25519 private keys.", field=field)


def dns_value(algorithm: str, public_key: str) -> str:
    """The TXT value published at <selector>._domainkey.<domain>."""
    kind = "ed25519" if algorithm == ED25519 else "rsa"
    return f"v=DKIM1; k={kind}; p={public_key}"


def new_selector() -> str:
    return f"pm{secrets.token_hex(6)}"
