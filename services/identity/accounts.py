"""Accounts and their API keys (domain code: no gRPC here)."""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from dataclasses import dataclass

from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from postmesh.common.auth import issue_api_key, parse_api_key, secret_matches
from postmesh.common.bus import EventPublisher, new_event
from postmesh.common.db import transaction
from postmesh.common.errors import InvalidArgument, NotFound, Unauthenticated
from postmesh.common.paging import keyset_page, split_page
from postmesh.common.service import Clock
from postmesh.events.v1 import events_pb2
from services.identity.models import Account, ApiKey

MAX_ACTIVE_KEYS = 20

# Owns the system sender identity (the domain of VERIFICATION_MAIL_FROM); it never has API keys.
SYSTEM_ACCOUNT_ID = "000000000000"


@dataclass(frozen=True)
class NewKey:
    key: ApiKey
    plaintext: str


def _new_account_id() -> str:
    # Twelve digits, like the sendingAccountId SES puts in its events.
    return f"{secrets.randbelow(10**12):012d}"


class AccountStore:
    def __init__(
        self, sessions: async_sessionmaker[AsyncSession], clock: Clock, events: EventPublisher
    ) -> None:
        self._sessions = sessions
        self._clock = clock
        self._events = events

    async def create_account(self, name: str) -> tuple[Account, NewKey]:
        name = name.strip()
        if not 1 <= len(name) <= 128:
            raise InvalidArgument("name must be 1 to 128 characters.", field="name")
        async with transaction(self._sessions) as session:
            account_id = _new_account_id()
            while await session.get(Account, account_id) is not None:
                account_id = _new_account_id()
            account = Account(account_id=account_id, name=name, status="ACTIVE", created_at=self._clock.now())
            session.add(account)
            await session.flush()
            new_key = self._add_key(session, account_id, "created with the account")
        return account, new_key

    def _add_key(self, session: AsyncSession, account_id: str, description: str) -> NewKey:
        issued = issue_api_key()
        key = ApiKey(
            key_id=issued.key_id,
            account_id=account_id,
            secret_hash=issued.secret_hash,
            description=description,
            created_at=self._clock.now(),
        )
        session.add(key)
        return NewKey(key, issued.plaintext)

    async def list_accounts(self, page_size: int, page_token: str) -> tuple[Sequence[Account], str]:
        # The system account (owner of the verification mail's sender identity) is internal.
        query = select(Account).where(Account.account_id != SYSTEM_ACCOUNT_ID)
        statement, size = keyset_page(query, Account.account_id, page_size, page_token)
        async with self._sessions() as session:
            rows = (await session.scalars(statement)).all()
        return split_page(rows, size, lambda a: a.account_id)

    async def get_account(self, account_id: str) -> Account:
        async with self._sessions() as session:
            account = await session.get(Account, account_id)
        if account is None:
            raise NotFound(f"Account {account_id} does not exist.")
        return account

    async def authenticate(self, api_key: str) -> ApiKey:
        """The live key behind `api_key`; UNAUTHENTICATED for unknown, wrong, revoked or disabled."""
        key_id, secret = parse_api_key(api_key)
        async with transaction(self._sessions) as session:
            key = await session.get(ApiKey, key_id)
            if key is None or not secret_matches(secret, key.secret_hash):
                raise Unauthenticated("The API key is not valid.", reason="INVALID_API_KEY")
            if key.revoked_at is not None:
                raise Unauthenticated("The API key has been revoked.", reason="API_KEY_REVOKED")
            account = await session.get(Account, key.account_id)
            if account is None or account.status != "ACTIVE":
                raise Unauthenticated("The account is disabled.", reason="ACCOUNT_DISABLED")
            key.last_used_at = self._clock.now()
        return key

    async def create_key(self, account_id: str, description: str) -> NewKey:
        if len(description) > 256:
            raise InvalidArgument("description must be at most 256 characters.", field="description")
        async with transaction(self._sessions) as session:
            active = (
                await session.scalars(
                    select(ApiKey.key_id).where(ApiKey.account_id == account_id, ApiKey.revoked_at.is_(None))
                )
            ).all()
            if len(active) >= MAX_ACTIVE_KEYS:
                raise InvalidArgument(
                    f"An account may hold at most {MAX_ACTIVE_KEYS} active API keys; revoke one first.",
                    field="description",
                    reason="LIMIT_EXCEEDED",
                )
            return self._add_key(session, account_id, description)

    async def list_keys(
        self, account_id: str, page_size: int, page_token: str, include_revoked: bool
    ) -> tuple[Sequence[ApiKey], str]:
        query = select(ApiKey).where(ApiKey.account_id == account_id)
        if not include_revoked:
            query = query.where(ApiKey.revoked_at.is_(None))
        statement, size = keyset_page(query, ApiKey.key_id, page_size, page_token)
        async with self._sessions() as session:
            rows = (await session.scalars(statement)).all()
        return split_page(rows, size, lambda k: k.key_id)

    async def _owned_live_key(self, session: AsyncSession, account_id: str, key_id: str) -> ApiKey:
        if not key_id:
            raise InvalidArgument("key_id is required.", field="key_id")
        key = await session.get(ApiKey, key_id)
        # Another account's key is reported exactly like a missing one.
        if key is None or key.account_id != account_id:
            raise NotFound(f"API key {key_id} does not exist.")
        return key

    async def revoke_key(self, account_id: str, key_id: str) -> ApiKey:
        async with transaction(self._sessions) as session:
            key = await self._owned_live_key(session, account_id, key_id)
            if key.revoked_at is None:
                await session.execute(
                    update(ApiKey).where(ApiKey.key_id == key_id).values(revoked_at=self._clock.now())
                )
                await session.refresh(key)
        await self._announce_revocation(account_id, key_id)
        return key

    async def rotate_key(self, account_id: str, key_id: str) -> tuple[NewKey, str]:
        async with transaction(self._sessions) as session:
            old = await self._owned_live_key(session, account_id, key_id)
            if old.revoked_at is not None:
                raise NotFound(f"API key {key_id} is already revoked.")
            old.revoked_at = self._clock.now()
            new_key = self._add_key(session, account_id, old.description or f"rotated from {key_id}")
        await self._announce_revocation(account_id, key_id)
        return new_key, key_id

    async def _announce_revocation(self, account_id: str, key_id: str) -> None:
        # Every service drops the key from its authentication cache on this event.
        await self._events.publish(
            new_event(account_id, api_key_revoked=events_pb2.ApiKeyRevoked(key_id=key_id))
        )
