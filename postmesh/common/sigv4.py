"""AWS Signature Version 4: the parts both the HTTP gateway and identity need.

The gateway rebuilds the canonical request and the string to sign from the HTTP request; identity,
which alone holds the key material, derives the signing key and compares. SigV4's chain starts with
HMAC("AWS4" + secret, date). A secret of 64 characters makes "AWS4" + secret longer than SHA-256's
64-byte block, and HMAC replaces such a key by its SHA-256 before use (RFC 2104, section 2), so
HMAC(SHA-256("AWS4" + secret), ...) is the same function: identity stores only that digest.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from urllib.parse import quote, unquote

ALGORITHM = "AWS4-HMAC-SHA256"
SECRET_LENGTH = 64
_SPACES = re.compile(r"\s+")


def key_material(secret: str) -> bytes:
    """What identity keeps (encrypted) instead of the secret: SHA-256("AWS4" + secret)."""
    return hashlib.sha256(f"AWS4{secret}".encode()).digest()


def _hmac(key: bytes, message: str) -> bytes:
    return hmac.new(key, message.encode(), hashlib.sha256).digest()


def signing_key(material: bytes, date: str, region: str, service: str) -> bytes:
    """The per-day, per-region, per-service key, from key_material() (or from "AWS4" + secret)."""
    return _hmac(_hmac(_hmac(_hmac(material, date), region), service), "aws4_request")


def signature(material: bytes, date: str, region: str, service: str, string_to_sign: str) -> str:
    return hmac.new(
        signing_key(material, date, region, service), string_to_sign.encode(), hashlib.sha256
    ).hexdigest()


class SignatureFormatError(ValueError):
    """The Authorization header is not a complete SigV4 header (SES: IncompleteSignature)."""


@dataclass(frozen=True)
class Credential:
    access_key_id: str
    date: str
    region: str
    service: str
    signed_headers: tuple[str, ...]
    signature: str

    @property
    def scope(self) -> str:
        return f"{self.date}/{self.region}/{self.service}/aws4_request"


_DATE = re.compile(r"^\d{8}$")
_HEX64 = re.compile(r"^[0-9a-f]{64}$")


def parse_authorization(header: str) -> Credential:
    algorithm, _, rest = header.strip().partition(" ")
    if algorithm != ALGORITHM:
        raise SignatureFormatError(f"Unsupported authorization algorithm; use {ALGORITHM}.")
    fields: dict[str, str] = {}
    for part in rest.split(","):
        name, sep, value = part.strip().partition("=")
        if not sep:
            raise SignatureFormatError(f"Authorization header component {part.strip()[:40]!r} is malformed.")
        fields[name] = value.strip()
    missing = [n for n in ("Credential", "SignedHeaders", "Signature") if not fields.get(n)]
    if missing:
        raise SignatureFormatError(f"Authorization header requires {', '.join(missing)}.")
    scope = fields["Credential"].split("/")
    if len(scope) != 5 or scope[4] != "aws4_request" or not all(scope[:4]) or not _DATE.match(scope[1]):
        raise SignatureFormatError(
            "Credential should be scoped to a valid region and service: "
            "<access key id>/<YYYYMMDD>/<region>/<service>/aws4_request."
        )
    signed = tuple(fields["SignedHeaders"].split(";"))
    if any(not h or h != h.lower() for h in signed) or list(signed) != sorted(signed):
        raise SignatureFormatError("SignedHeaders must be lower-case header names, sorted, ';'-separated.")
    if not _HEX64.match(fields["Signature"]):
        raise SignatureFormatError("Signature must be 64 lower-case hexadecimal characters.")
    return Credential(scope[0], scope[1], scope[2], scope[3], signed, fields["Signature"])


def _remove_dot_segments(path: str) -> str:
    output: list[str] = []
    for segment in path.split("/"):
        if segment == "..":
            if output:
                output.pop()
        elif segment != ".":
            output.append(segment)
    normalized = "/".join(output)
    if not normalized.startswith("/"):
        normalized = "/" + normalized
    if path.endswith("/") and not normalized.endswith("/"):
        normalized += "/"
    return normalized


def canonical_uri(raw_path: str) -> str:
    """The path as sent, normalized and URI-encoded once more (SigV4 encodes twice, except for S3)."""
    return quote(_remove_dot_segments(raw_path or "/"), safe="/~")


def canonical_query(raw_query: str) -> str:
    pairs: list[tuple[str, str]] = []
    for item in filter(None, raw_query.split("&")):
        name, _, value = item.partition("=")
        pairs.append((quote(unquote(name), safe="-_.~"), quote(unquote(value), safe="-_.~")))
    return "&".join(f"{n}={v}" for n, v in sorted(pairs))


def canonical_headers(signed: Sequence[str], headers: Iterable[tuple[str, str]]) -> str:
    values: dict[str, list[str]] = {}
    for name, value in headers:
        values.setdefault(name.lower(), []).append(_SPACES.sub(" ", value.strip()))
    return "".join(f"{name}:{','.join(values.get(name, []))}\n" for name in signed)


def string_to_sign(
    *,
    method: str,
    raw_path: str,
    raw_query: str,
    headers: Iterable[tuple[str, str]],
    credential: Credential,
    amz_date: str,
    payload_hash: str,
) -> str:
    canonical = "\n".join(
        [
            method.upper(),
            canonical_uri(raw_path),
            canonical_query(raw_query),
            canonical_headers(credential.signed_headers, headers),
            ";".join(credential.signed_headers),
            payload_hash,
        ]
    )
    digest = hashlib.sha256(canonical.encode()).hexdigest()
    return f"{ALGORITHM}\n{amz_date}\n{credential.scope}\n{digest}"
