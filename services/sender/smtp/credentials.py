"""Who is sending over SMTP: a user name and password checked with identity, kept for a short while.

A positive answer is kept for `cache_seconds` so a busy client does not cost identity a call per
connection; a revocation (an ApiKeyRevoked event naming the user name, seen by every replica) drops it
at once, and sessions already logged in with it are refused at their next MAIL or DATA.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from postmesh.common.errors import Unauthenticated

_CACHE_LIMIT = 100_000


@dataclass(frozen=True)
class SmtpLogin:
    account_id: str
    username: str
    # sha256 of user name and password: what the cache is keyed by (the password is never kept).
    digest: str


# (user name, password) -> account id; raises Unauthenticated for invalid credentials.
CredentialLookup = Callable[[str, str], Awaitable[str]]


def _digest(username: str, password: str) -> str:
    return hashlib.sha256(f"{username}\x00{password}".encode()).hexdigest()


class SmtpCredentials:
    def __init__(
        self, lookup: CredentialLookup, cache_seconds: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._lookup = lookup
        self._cache_seconds = cache_seconds
        self._clock = clock
        self._logins: dict[str, tuple[float, SmtpLogin]] = {}
        # Revoked while this process ran: sessions that logged in earlier stop at their next command.
        self._revoked: set[str] = set()

    async def login(self, username: str, password: str) -> SmtpLogin:
        digest = _digest(username, password)
        kept = self._logins.get(digest)
        if kept is not None and kept[0] > self._clock():
            return kept[1]
        account_id = await self._lookup(username, password)
        login = SmtpLogin(account_id, username, digest)
        if len(self._logins) >= _CACHE_LIMIT:
            self._logins.clear()
        self._logins[digest] = (self._clock() + self._cache_seconds, login)
        return login

    def still_valid(self, login: SmtpLogin) -> bool:
        """False once the credential was revoked (user names are never reused)."""
        return login.username not in self._revoked

    def forget(self, username: str) -> None:
        if len(self._revoked) >= _CACHE_LIMIT:
            self._revoked.clear()
        self._revoked.add(username)
        for digest, (_, login) in list(self._logins.items()):
            if login.username == username:
                del self._logins[digest]


__all__ = ["CredentialLookup", "SmtpCredentials", "SmtpLogin", "Unauthenticated"]
