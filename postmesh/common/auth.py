"""Who is calling: API keys for accounts, the admin credential for operators, the service credential.

Every RPC declares an Access level. The server interceptor authenticates the `authorization: Bearer`
metadata against it and puts the Principal in a context variable that handlers read.
"""

from __future__ import annotations

import contextvars
import hashlib
import hmac
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from enum import Enum

from postmesh.common.cache import TtlCache
from postmesh.common.errors import InvalidArgument, PermissionDenied, Unauthenticated

API_KEY_PREFIX = "pm"
ACCOUNT_HEADER = "x-postmesh-account"


class Access(Enum):
    PUBLIC = "public"  # no credential (health checks, the confirmation link)
    ACCOUNT = "account"  # an account's API key, or the service credential acting for an account
    ADMIN = "admin"  # the operator credential
    INTERNAL = "internal"  # the service credential only


class PrincipalKind(Enum):
    ANONYMOUS = "anonymous"
    ACCOUNT = "account"
    ADMIN = "admin"
    SERVICE = "service"


@dataclass(frozen=True)
class Principal:
    kind: PrincipalKind
    account_id: str = ""
    key_id: str = ""


ANONYMOUS = Principal(PrincipalKind.ANONYMOUS)
principal_var: contextvars.ContextVar[Principal] = contextvars.ContextVar("principal", default=ANONYMOUS)


def current_principal() -> Principal:
    return principal_var.get()


def caller_account_id() -> str:
    """The account the current call acts for; every account-scoped query filters on it."""
    principal = principal_var.get()
    if not principal.account_id:
        raise Unauthenticated("This operation needs an account's API key.", reason="MISSING_ACCOUNT")
    return principal.account_id


def account_for_internal_call(account_id: str) -> str:
    """For INTERNAL RPCs that name the account in the request."""
    if not account_id:
        raise InvalidArgument("account_id is required.", field="account_id")
    return account_id


# --- API keys: "pm_<key id>_<secret>"; only sha256(secret) is stored (the secret has 256 random bits).


@dataclass(frozen=True)
class IssuedKey:
    key_id: str
    secret_hash: str
    plaintext: str


def issue_api_key() -> IssuedKey:
    key_id = secrets.token_hex(8)
    secret = secrets.token_urlsafe(32)
    return IssuedKey(key_id, hash_secret(secret), f"{API_KEY_PREFIX}_{key_id}_{secret}")


def hash_secret(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def parse_api_key(api_key: str) -> tuple[str, str]:
    """Splits an API key into (key id, secret); UNAUTHENTICATED when it is not one of ours."""
    parts = api_key.split("_", 2)
    if len(parts) != 3 or parts[0] != API_KEY_PREFIX or not parts[1] or not parts[2]:
        raise Unauthenticated("The API key is malformed.", reason="INVALID_API_KEY")
    return parts[1], parts[2]


def secret_matches(secret: str, stored_hash: str) -> bool:
    return hmac.compare_digest(hash_secret(secret), stored_hash)


def bearer_token(metadata: dict[str, str]) -> str:
    value = metadata.get("authorization", "")
    if not value:
        return ""
    scheme, _, token = value.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise Unauthenticated(
            "The authorization metadata must be 'Bearer <API key>'.", reason="INVALID_API_KEY"
        )
    return token.strip()


# --- Resolving a bearer token to a Principal.

KeyLookup = Callable[[str], Awaitable[Principal]]


class Authenticator:
    """Checks credentials: admin and service keys from configuration, API keys by asking identity.

    Positive answers about API keys are cached for `cache_seconds`; a revocation event clears the entry
    at once (see forget_key).
    """

    def __init__(
        self,
        *,
        admin_key: str,
        service_key: str,
        lookup: KeyLookup,
        cache_seconds: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._admin_key = admin_key
        self._service_key = service_key
        self._lookup = lookup
        self._cache: TtlCache[str, Principal] = TtlCache(cache_seconds, clock=clock)

    async def authenticate(self, metadata: dict[str, str], access: Access) -> Principal:
        if access is Access.PUBLIC:
            return ANONYMOUS
        token = bearer_token(metadata)
        if not token:
            raise Unauthenticated(
                "Missing API key: send 'authorization: Bearer <API key>'.", reason="MISSING_API_KEY"
            )
        if self._admin_key and hmac.compare_digest(token, self._admin_key):
            if access is Access.ADMIN:
                return Principal(PrincipalKind.ADMIN)
            raise PermissionDenied("The admin credential cannot call account operations.")
        if self._service_key and hmac.compare_digest(token, self._service_key):
            account_id = metadata.get(ACCOUNT_HEADER, "")
            if access is Access.INTERNAL or (access is Access.ACCOUNT and account_id):
                return Principal(PrincipalKind.SERVICE, account_id=account_id)
            raise PermissionDenied("The service credential cannot call this operation.")
        principal = await self._account_principal(token)
        if access is Access.ACCOUNT:
            return principal
        if access is Access.ADMIN:
            raise PermissionDenied("This operation is for operators only.", reason="ADMIN_ONLY")
        raise PermissionDenied("This operation is internal to postmesh.", reason="INTERNAL_ONLY")

    async def _account_principal(self, token: str) -> Principal:
        key_id, _ = parse_api_key(token)
        digest = hash_secret(token)
        cached = self._cache.get(digest)
        if cached is not None:
            return cached
        principal = await self._lookup(token)
        if principal.key_id != key_id:
            raise Unauthenticated("The API key is not valid.", reason="INVALID_API_KEY")
        self._cache.put(digest, principal)
        return principal

    def forget_key(self, key_id: str) -> None:
        self._cache.discard_where(lambda _, principal: principal.key_id == key_id)
