"""SigV4 authentication of an HTTP request: format, date and payload checks here; the signature
itself is checked by identity (VerifyAccessKeySignature), which alone holds the key material."""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass

from postmesh.common import sigv4
from services.gateway.errors import (
    INCOMPLETE_SIGNATURE,
    INVALID_SIGNATURE,
    MISSING_AUTHENTICATION,
    ApiError,
)

AMZ_DATE_FORMAT = "%Y%m%dT%H%M%SZ"
SIGNING_SERVICES = ("ses", "email")


@dataclass(frozen=True)
class HttpRequest:
    """What the signature covers, as received."""

    method: str
    raw_path: str
    raw_query: str
    headers: Iterable[tuple[str, str]]
    body: bytes


@dataclass(frozen=True)
class SignatureCheck:
    """What identity is asked to verify."""

    credential: sigv4.Credential
    string_to_sign: str


Verifier = Callable[[SignatureCheck], Awaitable[str]]


def _header(headers: Iterable[tuple[str, str]], name: str) -> str:
    for key, value in headers:
        if key.lower() == name:
            return value
    return ""


def parse_amz_date(value: str) -> dt.datetime | None:
    try:
        return dt.datetime.strptime(value, AMZ_DATE_FORMAT).replace(tzinfo=dt.UTC)
    except ValueError:
        return None


def signature_check(request: HttpRequest, now: dt.datetime, max_skew_seconds: float) -> SignatureCheck:
    """Everything about the signature that needs no key; ApiError with SES's error when it fails."""
    headers = list(request.headers)
    authorization = _header(headers, "authorization")
    if not authorization:
        raise ApiError(MISSING_AUTHENTICATION, "Missing Authentication Token")
    try:
        credential = sigv4.parse_authorization(authorization)
    except sigv4.SignatureFormatError as exc:
        raise ApiError(INCOMPLETE_SIGNATURE, str(exc)) from None
    if "host" not in credential.signed_headers:
        raise ApiError(INCOMPLETE_SIGNATURE, "'Host' must be a signed header.")
    amz_date_text = _header(headers, "x-amz-date")
    if not amz_date_text:
        raise ApiError(
            INCOMPLETE_SIGNATURE, "Authorization header requires existence of a 'X-Amz-Date' header."
        )
    if "x-amz-date" not in credential.signed_headers:
        raise ApiError(INCOMPLETE_SIGNATURE, "'X-Amz-Date' must be a signed header.")
    amz_date = parse_amz_date(amz_date_text)
    if amz_date is None:
        raise ApiError(
            INCOMPLETE_SIGNATURE, "X-Amz-Date must be in the ISO-8601 basic format YYYYMMDD'T'HHMMSS'Z'."
        )
    if credential.date != amz_date_text[:8]:
        raise ApiError(
            INVALID_SIGNATURE,
            "Date in Credential scope does not match YYYYMMDD from ISO-8601 version of date from HTTP.",
        )
    if credential.service not in SIGNING_SERVICES:
        raise ApiError(
            INVALID_SIGNATURE,
            f"Credential should be scoped to correct service: 'ses' (not {credential.service[:32]!r}).",
        )
    skew = dt.timedelta(seconds=max_skew_seconds)
    if amz_date < now - skew:
        raise ApiError(
            INVALID_SIGNATURE,
            f"Signature expired: {amz_date_text} is now earlier than "
            f"{(now - skew).strftime(AMZ_DATE_FORMAT)} ({now.strftime(AMZ_DATE_FORMAT)} - "
            f"{int(max_skew_seconds // 60)} min.)",
        )
    if amz_date > now + skew:
        raise ApiError(
            INVALID_SIGNATURE,
            f"Signature not yet current: {amz_date_text} is still later than "
            f"{(now + skew).strftime(AMZ_DATE_FORMAT)} ({now.strftime(AMZ_DATE_FORMAT)} + "
            f"{int(max_skew_seconds // 60)} min.)",
        )
    actual_hash = hashlib.sha256(request.body).hexdigest()
    declared_hash = _header(headers, "x-amz-content-sha256")
    if declared_hash and not hmac.compare_digest(declared_hash.encode(), actual_hash.encode()):
        raise ApiError(
            INVALID_SIGNATURE, "The provided 'x-amz-content-sha256' header does not match the body."
        )
    to_sign = sigv4.string_to_sign(
        method=request.method,
        raw_path=request.raw_path,
        raw_query=request.raw_query,
        headers=headers,
        credential=credential,
        amz_date=amz_date_text,
        payload_hash=declared_hash or actual_hash,
    )
    return SignatureCheck(credential, to_sign)
