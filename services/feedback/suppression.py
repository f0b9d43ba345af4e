"""The account suppression list (domain code: no gRPC here)."""

from __future__ import annotations

import datetime as dt
from collections.abc import Awaitable, Callable, Iterable, Sequence

from sqlalchemy import delete, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from postmesh.common.addresses import address_key, normalize_address
from postmesh.common.db import transaction
from postmesh.common.errors import InvalidArgument, NotFound
from postmesh.common.paging import keyset_page, split_page
from postmesh.common.service import Clock
from services.feedback.models import SuppressedDestination

REASONS = ("BOUNCE", "COMPLAINT")
MAX_CHECK = 1000
# Rows per multi-row statement of a bulk change, well under SQLite's limit on bound parameters.
_BULK_ROWS = 400


class SuppressionList:
    """`added(account_id)` runs after every committed addition (the SuppressionListChanged event):
    a sender that knows an account's list to be empty answers from memory until it hears of one. It
    runs after the commit, so a sender asking again sees the row; if it fails, the caller sees the
    error and retries (adding is idempotent)."""

    def __init__(
        self,
        sessions: async_sessionmaker[AsyncSession],
        clock: Clock,
        *,
        added: Callable[[str], Awaitable[None]] | None = None,
    ) -> None:
        self._sessions = sessions
        self._clock = clock
        self._added = added
        self._insert = (
            postgresql.insert if sessions.kw["bind"].dialect.name == "postgresql" else sqlite.insert
        )

    async def put_many(self, account_id: str, entries: Sequence[tuple[str, str]]) -> None:
        """Adds or updates many (normalized address, reason) at once (an import); the last entry of
        an address wins."""
        now = self._clock.now()
        rows = {
            address_key(address): {
                "account_id": account_id,
                "address_key": address_key(address),
                "email_address": address,
                "reason": reason,
                "message_id": "",
                "feedback_id": "",
                "updated_at": now,
            }
            for address, reason in entries
        }
        values = list(rows.values())
        async with transaction(self._sessions) as session:
            for start in range(0, len(values), _BULK_ROWS):
                statement = self._insert(SuppressedDestination).values(values[start : start + _BULK_ROWS])
                await session.execute(
                    statement.on_conflict_do_update(
                        index_elements=["account_id", "address_key"],
                        set_={
                            column: getattr(statement.excluded, column)
                            for column in (
                                "email_address",
                                "reason",
                                "message_id",
                                "feedback_id",
                                "updated_at",
                            )
                        },
                    )
                )
        if values and self._added is not None:
            await self._added(account_id)

    async def delete_many(self, account_id: str, addresses: Sequence[str]) -> None:
        keys = list({address_key(a) for a in addresses})
        async with transaction(self._sessions) as session:
            for start in range(0, len(keys), _BULK_ROWS):
                await session.execute(
                    delete(SuppressedDestination).where(
                        SuppressedDestination.account_id == account_id,
                        SuppressedDestination.address_key.in_(keys[start : start + _BULK_ROWS]),
                    )
                )

    async def put(
        self, account_id: str, address: str, reason: str, *, message_id: str = "", feedback_id: str = ""
    ) -> SuppressedDestination:
        address = normalize_address(address)
        if reason not in REASONS:
            raise InvalidArgument("reason must be BOUNCE or COMPLAINT.", field="reason")
        key = address_key(address)
        async with transaction(self._sessions) as session:
            row = await session.scalar(
                select(SuppressedDestination).where(
                    SuppressedDestination.account_id == account_id, SuppressedDestination.address_key == key
                )
            )
            if row is None:
                row = SuppressedDestination(account_id=account_id, address_key=key)
                session.add(row)
            row.email_address = address
            row.reason = reason
            row.message_id = message_id
            row.feedback_id = feedback_id
            row.updated_at = self._clock.now()
        if self._added is not None:
            await self._added(account_id)
        return row

    async def get(self, account_id: str, address: str) -> SuppressedDestination:
        key = address_key(normalize_address(address))
        async with self._sessions() as session:
            row = await session.scalar(
                select(SuppressedDestination).where(
                    SuppressedDestination.account_id == account_id, SuppressedDestination.address_key == key
                )
            )
        if row is None:
            raise NotFound(f"{address} is not on the account's suppression list.")
        return row

    async def delete(self, account_id: str, address: str) -> None:
        key = address_key(normalize_address(address))
        async with transaction(self._sessions) as session:
            result = await session.execute(
                delete(SuppressedDestination).where(
                    SuppressedDestination.account_id == account_id, SuppressedDestination.address_key == key
                )
            )
        if not result.rowcount:  # type: ignore[attr-defined]
            raise NotFound(f"{address} is not on the account's suppression list.")

    async def list(
        self,
        account_id: str,
        reasons: Iterable[str],
        start: dt.datetime | None,
        end: dt.datetime | None,
        page_size: int,
        page_token: str,
    ) -> tuple[Sequence[SuppressedDestination], str]:
        query = select(SuppressedDestination).where(SuppressedDestination.account_id == account_id)
        wanted = list(reasons)
        if wanted:
            query = query.where(SuppressedDestination.reason.in_(wanted))
        if start is not None:
            query = query.where(SuppressedDestination.updated_at >= start)
        if end is not None:
            query = query.where(SuppressedDestination.updated_at < end)
        statement, size = keyset_page(query, SuppressedDestination.address_key, page_size, page_token)
        async with self._sessions() as session:
            rows = (await session.scalars(statement)).all()
        return split_page(rows, size, lambda r: r.address_key)

    async def is_empty(self, account_id: str) -> bool:
        async with self._sessions() as session:
            found = await session.scalar(
                select(SuppressedDestination.address_key)
                .where(SuppressedDestination.account_id == account_id)
                .limit(1)
            )
        return found is None

    async def check(self, account_id: str, addresses: Sequence[str]) -> Sequence[SuppressedDestination]:
        """The given addresses that are suppressed (addresses are compared case-insensitively)."""
        if len(addresses) > MAX_CHECK:
            raise InvalidArgument(f"At most {MAX_CHECK} addresses per check.", field="email_addresses")
        keys = {address_key(a) for a in addresses}
        if not keys:
            return []
        async with self._sessions() as session:
            rows = await session.scalars(
                select(SuppressedDestination).where(
                    SuppressedDestination.account_id == account_id,
                    SuppressedDestination.address_key.in_(keys),
                )
            )
            return rows.all()
