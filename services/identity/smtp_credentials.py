"""SMTP credentials: a user name and password per application, acting for one account (domain code).

Like API keys, the password has 256 random bits and only its sha256 is stored; it is shown once. A
revocation is announced with the same ApiKeyRevoked event as an API key's (key_id = the user name), so
every SMTP server drops the credential from its cache at once.
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from dataclasses import dataclass

from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from postmesh.common.auth import hash_secret, secret_matches
from postmesh.common.bus import EventPublisher, new_event
from postmesh.common.db import transaction
from postmesh.common.errors import InvalidArgument, NotFound, Unauthenticated
from postmesh.common.paging import keyset_page, split_page
from postmesh.common.service import Clock
from postmesh.events.v1 import events_pb2
from services.identity.models import Account, SmtpCredential

MAX_ACTIVE_CREDENTIALS = 20
USERNAME_PREFIX = "PM"
_USERNAME_ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZ234567"


@dataclass(frozen=True)
class NewCredential:
    credential: SmtpCredential
    password: str


def _new_username() -> str:
    # Twenty characters, like the access key ids SES hands out as SMTP user names.
    return USERNAME_PREFIX + "".join(secrets.choice(_USERNAME_ALPHABET) for _ in range(18))


class SmtpCredentialStore:
    def __init__(
        self, sessions: async_sessionmaker[AsyncSession], clock: Clock, events: EventPublisher
    ) -> None:
        self._sessions = sessions
        self._clock = clock
        self._events = events

    async def create(self, account_id: str, description: str) -> NewCredential:
        if len(description) > 256:
            raise InvalidArgument("description must be at most 256 characters.", field="description")
        password = secrets.token_urlsafe(32)
        async with transaction(self._sessions) as session:
            active = (
                await session.scalars(
                    select(SmtpCredential.username).where(
                        SmtpCredential.account_id == account_id, SmtpCredential.revoked_at.is_(None)
                    )
                )
            ).all()
            if len(active) >= MAX_ACTIVE_CREDENTIALS:
                raise InvalidArgument(
                    f"An account may hold at most {MAX_ACTIVE_CREDENTIALS} active SMTP credentials; "
                    "revoke one first.",
                    field="description",
                    reason="LIMIT_EXCEEDED",
                )
            username = _new_username()
            while await session.get(SmtpCredential, username) is not None:
                username = _new_username()
            credential = SmtpCredential(
                username=username,
                account_id=account_id,
                secret_hash=hash_secret(password),
                description=description,
                created_at=self._clock.now(),
            )
            session.add(credential)
        return NewCredential(credential, password)

    async def list(
        self, account_id: str, page_size: int, page_token: str, include_revoked: bool
    ) -> tuple[Sequence[SmtpCredential], str]:
        query = select(SmtpCredential).where(SmtpCredential.account_id == account_id)
        if not include_revoked:
            query = query.where(SmtpCredential.revoked_at.is_(None))
        statement, size = keyset_page(query, SmtpCredential.username, page_size, page_token)
        async with self._sessions() as session:
            rows = (await session.scalars(statement)).all()
        return split_page(rows, size, lambda c: c.username)

    async def revoke(self, account_id: str, username: str) -> SmtpCredential:
        if not username:
            raise InvalidArgument("username is required.", field="username")
        async with transaction(self._sessions) as session:
            credential = await session.get(SmtpCredential, username)
            # Another account's credential is reported exactly like a missing one.
            if credential is None or credential.account_id != account_id:
                raise NotFound(f"SMTP credential {username} does not exist.")
            if credential.revoked_at is None:
                await session.execute(
                    update(SmtpCredential)
                    .where(SmtpCredential.username == username)
                    .values(revoked_at=self._clock.now())
                )
                await session.refresh(credential)
        await self._events.publish(
            new_event(account_id, api_key_revoked=events_pb2.ApiKeyRevoked(key_id=username))
        )
        return credential

    async def authenticate(self, username: str, password: str) -> SmtpCredential:
        """The live credential; UNAUTHENTICATED for an unknown user, a wrong password, a revoked
        credential or a disabled account (all alike to the caller, as SES answers 535 to each)."""
        refused = Unauthenticated("Authentication Credentials Invalid", reason="INVALID_SMTP_CREDENTIALS")
        if not username or not password or len(username) > 32:
            raise refused
        async with transaction(self._sessions) as session:
            credential = await session.get(SmtpCredential, username)
            if credential is None or not secret_matches(password, credential.secret_hash):
                raise refused
            if credential.revoked_at is not None:
                raise refused
            account = await session.get(Account, credential.account_id)
            if account is None or account.status != "ACTIVE":
                raise refused
            credential.last_used_at = self._clock.now()
        return credential
