"""SigV4 access keys of the HTTP API (domain code: no gRPC here).

An access key id is "AKPM" and 16 base32 characters; its 64-character secret is shown once. Identity
stores neither the secret nor anything a caller could sign with directly: only SHA-256("AWS4" +
secret), sealed under the DKIM master keys, from which postmesh.common.sigv4 derives the same signing
keys as the secret would (see its docstring). Verification reads the key on every request (no cache),
so a revoked key is refused at once.
"""

from __future__ import annotations

import base64
import hmac
import secrets
from collections.abc import Sequence
from dataclasses import dataclass

from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from postmesh.common import sigv4
from postmesh.common.db import transaction
from postmesh.common.errors import InvalidArgument, NotFound, Unauthenticated
from postmesh.common.paging import keyset_page, split_page
from postmesh.common.service import Clock
from services.identity.dkimkeys import MasterKeys, Sealed
from services.identity.models import AccessKey, Account

ACCESS_KEY_PREFIX = "AKPM"
MAX_ACTIVE_ACCESS_KEYS = 10
SIGNING_SERVICES = ("ses", "email")


@dataclass(frozen=True)
class NewAccessKey:
    key: AccessKey
    secret: str


@dataclass(frozen=True)
class SignedRequest:
    access_key_id: str
    date: str
    region: str
    service: str
    string_to_sign: str
    signature: str


def new_access_key_id() -> str:
    return ACCESS_KEY_PREFIX + base64.b32encode(secrets.token_bytes(10)).decode()


def new_secret() -> str:
    secret = secrets.token_urlsafe(48)
    assert len(secret) == sigv4.SECRET_LENGTH
    return secret


def _aad_id(access_key_id: str) -> str:
    # Sealed blobs are bound to their row; the prefix keeps access keys apart from DKIM key ids.
    return f"access-key:{access_key_id}"


async def rewrap_access_keys(session: AsyncSession, master_keys: MasterKeys) -> tuple[int, int]:
    """Re-encrypts access keys' data keys under the current master key, in the caller's transaction
    (RewrapDkimKeys: after it, the old master key can be removed). Returns (rewrapped, already current)."""
    rewrapped = current = 0
    for key in (await session.scalars(select(AccessKey))).all():
        if key.master_key_id == master_keys.current_id:
            current += 1
            continue
        key.wrapped_data_key = master_keys.rewrap(
            _aad_id(key.access_key_id), key.wrapped_data_key, key.master_key_id
        )
        key.master_key_id = master_keys.current_id
        rewrapped += 1
    return rewrapped, current


class AccessKeyStore:
    def __init__(
        self, sessions: async_sessionmaker[AsyncSession], clock: Clock, master_keys: MasterKeys
    ) -> None:
        self._sessions = sessions
        self._clock = clock
        self._master_keys = master_keys

    async def create(self, account_id: str, description: str) -> NewAccessKey:
        if len(description) > 256:
            raise InvalidArgument("description must be at most 256 characters.", field="description")
        async with transaction(self._sessions) as session:
            active = await session.scalar(
                select(func.count())
                .select_from(AccessKey)
                .where(AccessKey.account_id == account_id, AccessKey.revoked_at.is_(None))
            )
            if (active or 0) >= MAX_ACTIVE_ACCESS_KEYS:
                raise InvalidArgument(
                    f"An account may hold at most {MAX_ACTIVE_ACCESS_KEYS} active access keys; "
                    "revoke one first.",
                    field="description",
                    reason="LIMIT_EXCEEDED",
                )
            access_key_id = new_access_key_id()
            secret = new_secret()
            sealed = self._master_keys.seal(_aad_id(access_key_id), sigv4.key_material(secret).hex())
            key = AccessKey(
                access_key_id=access_key_id,
                account_id=account_id,
                encrypted_signing_key=sealed.encrypted_private_key,
                wrapped_data_key=sealed.wrapped_data_key,
                master_key_id=sealed.master_key_id,
                description=description,
                created_at=self._clock.now(),
            )
            session.add(key)
        return NewAccessKey(key, secret)

    async def list(
        self, account_id: str, page_size: int, page_token: str, include_revoked: bool
    ) -> tuple[Sequence[AccessKey], str]:
        query = select(AccessKey).where(AccessKey.account_id == account_id)
        if not include_revoked:
            query = query.where(AccessKey.revoked_at.is_(None))
        statement, size = keyset_page(query, AccessKey.access_key_id, page_size, page_token)
        async with self._sessions() as session:
            rows = (await session.scalars(statement)).all()
        return split_page(rows, size, lambda k: k.access_key_id)

    async def revoke(self, account_id: str, access_key_id: str) -> AccessKey:
        if not access_key_id:
            raise InvalidArgument("access_key_id is required.", field="access_key_id")
        async with transaction(self._sessions) as session:
            key = await session.get(AccessKey, access_key_id)
            # Another account's key is reported exactly like a missing one.
            if key is None or key.account_id != account_id:
                raise NotFound(f"Access key {access_key_id} does not exist.")
            if key.revoked_at is None:
                key.revoked_at = self._clock.now()
        return key

    async def verify(self, request: SignedRequest) -> AccessKey:
        """The live key that made `request.signature`; UNAUTHENTICATED otherwise."""
        if request.service not in SIGNING_SERVICES:
            raise Unauthenticated(
                f"Credential should be scoped to a valid service ({' or '.join(SIGNING_SERVICES)}), "
                f"not {request.service[:64]!r}.",
                reason="INVALID_SIGNATURE",
            )
        async with transaction(self._sessions) as session:
            key = await session.get(AccessKey, request.access_key_id)
            if key is None:
                raise Unauthenticated(
                    "The security token included in the request is invalid.", reason="UNRECOGNIZED_CLIENT"
                )
            if key.revoked_at is not None:
                raise Unauthenticated("The access key has been revoked.", reason="ACCESS_KEY_REVOKED")
            material = bytes.fromhex(
                self._master_keys.open(
                    _aad_id(key.access_key_id),
                    Sealed(key.encrypted_signing_key, key.wrapped_data_key, key.master_key_id),
                )
            )
            expected = sigv4.signature(
                material, request.date, request.region, request.service, request.string_to_sign
            )
            if not hmac.compare_digest(expected, request.signature):
                raise Unauthenticated(
                    "The request signature we calculated does not match the signature you provided. "
                    "Check your AWS Secret Access Key and signing method.",
                    reason="INVALID_SIGNATURE",
                )
            account = await session.get(Account, key.account_id)
            if account is None or account.status != "ACTIVE":
                raise Unauthenticated("The account is disabled.", reason="ACCOUNT_DISABLED")
            key.last_used_at = self._clock.now()
        return key
