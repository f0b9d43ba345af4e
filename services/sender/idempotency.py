"""Client idempotency keys (request_id) for the send RPCs (domain code: no gRPC here).

The first call with a key claims it (a row with freshly drawn message ids and no result): the
request id -> message ids intent is durable before anything is queued. The call records its result
once the messages are queued, or gives the key up when it is refused before anything was queued. A
call whose outcome is unknown (the queue did not answer, the call failed or was cancelled after it
began queueing) releases its claim instead: a retry takes it over at once with the same message ids
and queues them again, which JetStream (Nats-Msg-Id) or the delivery workers' ledger of queued
copies (postmesh.common.outbound.first_copy) make harmless. A retry that arrives while the first
call still runs is told to retry; one that finds a claim left by a process that died takes it over
once the claim's lease has run out.
"""

from __future__ import annotations

import datetime as dt
import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from sqlalchemy import delete, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from postmesh.common.db import transaction
from postmesh.common.errors import InvalidArgument, Unavailable
from postmesh.common.service import Clock
from services.sender.models import SendRequest

_REQUEST_ID = re.compile(r"^[\x21-\x7e]{1,128}$")
# An accept takes seconds; a claim untouched for this long belongs to a process that died.
CLAIM_LEASE = dt.timedelta(seconds=60)
KEY_RETENTION = dt.timedelta(hours=24)
# updated_at of a released claim: older than any lease.
_RELEASED = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)


@dataclass(frozen=True)
class Claim:
    request_id: str
    message_ids: list[str]
    # The first call's result when it already finished: replay it, queue nothing.
    result: Any | None = None


class IdempotencyKeys:
    def __init__(
        self, sessions: async_sessionmaker[AsyncSession], clock: Clock, *, lease: dt.timedelta = CLAIM_LEASE
    ) -> None:
        self._sessions = sessions
        self._clock = clock
        self._lease = lease

    async def claim(
        self,
        account_id: str,
        request_id: str,
        fingerprint: str,
        count: int,
        new_id: Callable[[], str],
    ) -> Claim:
        if not request_id:
            return Claim("", [new_id() for _ in range(count)])
        if not _REQUEST_ID.match(request_id):
            raise InvalidArgument(
                "request_id must be 1 to 128 printable ASCII characters.", field="request_id"
            )
        now = self._clock.now()
        ids = [new_id() for _ in range(count)]
        try:
            async with transaction(self._sessions) as session:
                session.add(
                    SendRequest(
                        account_id=account_id,
                        request_id=request_id,
                        fingerprint=fingerprint,
                        message_ids=json.dumps(ids),
                        result="",
                        created_at=now,
                        updated_at=now,
                    )
                )
            return Claim(request_id, ids)
        except IntegrityError:
            pass  # the key was seen before
        async with transaction(self._sessions) as session:
            row = await session.scalar(
                select(SendRequest).where(
                    SendRequest.account_id == account_id, SendRequest.request_id == request_id
                )
            )
            if row is None:  # given up by its first call in the meantime: claim it afresh
                return await self.claim(account_id, request_id, fingerprint, count, new_id)
            if row.fingerprint != fingerprint:
                raise InvalidArgument(
                    "This request_id was already used for a different request.",
                    field="request_id",
                    reason="IDEMPOTENCY_KEY_REUSED",
                )
            if row.result:
                return Claim(request_id, json.loads(row.message_ids), json.loads(row.result))
            if now - row.updated_at < self._lease:
                raise Unavailable(
                    "A request with this request_id is still being processed; retry shortly.",
                    reason="REQUEST_IN_PROGRESS",
                    retry_after_seconds=1.0,
                )
            # Take the abandoned claim over, unless another retry just did.
            taken = await session.execute(
                update(SendRequest)
                .where(SendRequest.id == row.id, SendRequest.updated_at == row.updated_at)
                .values(updated_at=now)
            )
            if taken.rowcount != 1:  # type: ignore[attr-defined]
                raise Unavailable(
                    "A request with this request_id is still being processed; retry shortly.",
                    reason="REQUEST_IN_PROGRESS",
                    retry_after_seconds=1.0,
                )
            return Claim(request_id, json.loads(row.message_ids))

    async def finish(self, account_id: str, claim: Claim, result: Any) -> None:
        if not claim.request_id:
            return
        async with transaction(self._sessions) as session:
            await session.execute(
                update(SendRequest)
                .where(SendRequest.account_id == account_id, SendRequest.request_id == claim.request_id)
                .values(result=json.dumps(result), updated_at=self._clock.now())
            )

    async def abandon(self, account_id: str, claim: Claim) -> None:
        """The call was refused: nothing was queued, so the key may be used again."""
        if not claim.request_id:
            return
        async with transaction(self._sessions) as session:
            await session.execute(
                delete(SendRequest).where(
                    SendRequest.account_id == account_id,
                    SendRequest.request_id == claim.request_id,
                    SendRequest.result == "",
                )
            )

    async def release(self, account_id: str, claim: Claim) -> None:
        """The call's outcome is unknown: a retry may take the claim over now (same message ids)."""
        if not claim.request_id:
            return
        async with transaction(self._sessions) as session:
            await session.execute(
                update(SendRequest)
                .where(
                    SendRequest.account_id == account_id,
                    SendRequest.request_id == claim.request_id,
                    SendRequest.result == "",
                )
                .values(updated_at=_RELEASED)
            )

    async def purge(self) -> int:
        """Forgets keys older than a day."""
        cutoff = self._clock.now() - KEY_RETENTION
        async with transaction(self._sessions) as session:
            result = await session.execute(delete(SendRequest).where(SendRequest.created_at < cutoff))
        return int(result.rowcount)  # type: ignore[attr-defined]
