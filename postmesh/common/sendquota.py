"""How a sender replica reserves send quota from the quota service (over gRPC).

The sender calls reserve() before queuing a message (one unit per recipient) and release() for what
it did not use. The quota service is the single authority; this client keeps it from being asked
once per message when an account sends fast:

- Lease: when an account's recent demand on this replica is more than a message per lease period,
  a reservation also asks for a short lease of extra messages (the service grants at most a fraction
  of a second of the account's rate). Reservations waiting for the call in progress count as demand
  too: sized by the recent rate alone, a lease would stay as small as a slow start made it, and
  concurrent senders would queue behind one quota call after another. Later reservations are served
  from the lease locally; at the end of the lease whatever is left is given back with
  ReleaseSendQuota.
- Refill: while an account stays busy, the next lease is asked for in the background once the
  current one is half used or half over, so reservations do not wait for a quota call at every
  lease's end.
- Refusal cache: a RESOURCE_EXHAUSTED refusal carries a retry-after; until then, reservations of at
  least as many messages are refused here with the same error, without a call.

Leased messages count as sent (against the rate and the 24-hour quota) from the moment they are
leased, so limits hold exactly across any number of replicas: a replica can only send what it holds.

Refusals are raised as postmesh domain errors (ResourceExhausted with retry_after_seconds,
FailedPrecondition ACCOUNT_SENDING_PAUSED, ...), carrying the quota service's reason and message,
so the sender's interceptor passes them on to its caller unchanged.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

from grpc import aio

from postmesh.common.clients import MeshClients, domain_error_from
from postmesh.common.errors import PostmeshError, ResourceExhausted
from postmesh.quota.v1 import quota_pb2

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Reservation:
    account_id: str
    reservation_id: str
    messages: int
    production_access: bool


@dataclass
class _Lease:
    reservation_id: str
    remaining: int
    expires_at: float
    production_access: bool


@dataclass
class _Account:
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    # Oldest first: the current lease and, while an account stays busy, its refill.
    leases: list[_Lease] = field(default_factory=list)
    refilling: bool = False
    # Refused until this time, for reservations of at least refused_messages.
    refused_until: float = 0.0
    refused_messages: int = 0
    refusal: PostmeshError | None = None
    # Messages of reservations waiting for the lock (a quota call is in progress).
    waiting: int = 0
    # Messages reserved in the current and the previous second: the demand estimate.
    second: int = 0
    this_second: int = 0
    last_second: int = 0


class SendQuotaClient:
    def __init__(
        self,
        clients: MeshClients,
        *,
        lease_seconds: float = 0.2,
        max_lease_messages: int = 10_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._clients = clients
        self._lease_seconds = lease_seconds
        self._max_lease = max_lease_messages
        self._clock = clock
        self._accounts: dict[str, _Account] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    def _account(self, account_id: str) -> _Account:
        account = self._accounts.get(account_id)
        if account is None:
            account = self._accounts[account_id] = _Account()
        return account

    def _note_demand(self, account: _Account, messages: int, now: float) -> None:
        second = int(now)
        if second != account.second:
            account.last_second = account.this_second if second == account.second + 1 else 0
            account.second, account.this_second = second, 0
        account.this_second += messages

    def _take_from_lease(
        self, account_id: str, account: _Account, messages: int, now: float
    ) -> Reservation | None:
        for lease in account.leases:
            if lease.remaining >= messages and now < lease.expires_at:
                lease.remaining -= messages
                return Reservation(account_id, lease.reservation_id, messages, lease.production_access)
        return None

    def _demand(self, account: _Account) -> int:
        """Messages this replica is expected to reserve for the account in one lease period."""
        return math.ceil(max(account.last_second, account.this_second) * self._lease_seconds)

    def _needs_refill(self, account: _Account, now: float) -> bool:
        if not account.leases or now < account.refused_until:
            return False
        # What is left of leases with at least half of their time still to run.
        lasting = sum(
            lease.remaining for lease in account.leases if now < lease.expires_at - self._lease_seconds / 2
        )
        return lasting * 2 < self._demand(account)

    def _spawn(self, coroutine: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def reserve(self, account_id: str, messages: int) -> Reservation:
        """Counts `messages` (one per recipient) against the account's quota, or raises the refusal
        (ResourceExhausted, FailedPrecondition, ... as postmesh domain errors)."""
        account = self._account(account_id)
        now = self._clock()
        self._note_demand(account, messages, now)
        taken = self._take_from_lease(account_id, account, messages, now)
        if taken is not None:
            if not account.refilling and self._needs_refill(account, now):
                account.refilling = True
                self._spawn(self._refill(account_id, account))
            return taken
        account.waiting += messages
        try:
            await account.lock.acquire()
        finally:
            account.waiting -= messages
        try:
            return await self._reserve_locked(account_id, account, messages)
        finally:
            account.lock.release()

    async def _reserve_locked(self, account_id: str, account: _Account, messages: int) -> Reservation:
        now = self._clock()
        # Another reservation may have brought a fresh lease while this one waited.
        taken = self._take_from_lease(account_id, account, messages, now)
        if taken is not None:
            return taken
        if (
            account.refusal is not None
            and now < account.refused_until
            and messages >= account.refused_messages
        ):
            raise _copy(account.refusal, account.refused_until - now)
        await self._return_lease(account_id, account)
        # Ask for a lease only when this replica sends more than a message per lease period, or
        # when other reservations already wait behind this one.
        recent = self._demand(account)
        wanted = max(recent if recent > messages else 0, account.waiting)
        lease_messages = min(wanted, self._max_lease)
        try:
            reply = await self._clients.quota.ReserveSendQuota(
                quota_pb2.ReserveSendQuotaRequest(
                    account_id=account_id, messages=messages, lease_messages=lease_messages
                ),
                timeout=10,
            )
        except aio.AioRpcError as exc:
            error = domain_error_from(exc)
            if isinstance(error, ResourceExhausted) and error.retry_after_seconds:
                account.refusal = error
                account.refused_until = self._clock() + error.retry_after_seconds
                account.refused_messages = messages
            raise error from None
        account.refusal = None
        self._add_lease(account_id, account, reply, max(reply.granted_messages - messages, 0))
        return Reservation(account_id, reply.reservation_id, messages, reply.production_access_enabled)

    def _add_lease(
        self, account_id: str, account: _Account, reply: quota_pb2.ReserveSendQuotaResponse, messages: int
    ) -> None:
        if messages <= 0:
            return
        lease = _Lease(
            reply.reservation_id,
            messages,
            self._clock() + (reply.lease_seconds or self._lease_seconds),
            reply.production_access_enabled,
        )
        account.leases.append(lease)
        asyncio.get_running_loop().call_later(
            lease.expires_at - self._clock(), self._expire, account_id, lease
        )

    async def _refill(self, account_id: str, account: _Account) -> None:
        """The next lease, before the current one runs out (a background task)."""
        try:
            async with account.lock:
                if not self._needs_refill(account, self._clock()):
                    return  # a reservation waiting for the lock took a lease meanwhile
                wanted = max(self._demand(account), account.waiting, 2)
                try:
                    reply = await self._clients.quota.ReserveSendQuota(
                        quota_pb2.ReserveSendQuotaRequest(
                            account_id=account_id, messages=1, lease_messages=min(wanted, self._max_lease) - 1
                        ),
                        timeout=10,
                    )
                except aio.AioRpcError as exc:
                    # Nothing was reserved; the reservations that need a lease ask for themselves.
                    error = domain_error_from(exc)
                    if isinstance(error, ResourceExhausted) and error.retry_after_seconds:
                        account.refusal = error
                        account.refused_until = self._clock() + error.retry_after_seconds
                        account.refused_messages = 1
                    return
                self._add_lease(account_id, account, reply, reply.granted_messages)
        finally:
            account.refilling = False

    async def release(self, reservation: Reservation, messages: int | None = None) -> None:
        """Gives back `messages` of a reservation (all of it by default) that were not sent."""
        count = reservation.messages if messages is None else messages
        if count <= 0:
            return
        account = self._account(reservation.account_id)
        for lease in account.leases:
            if lease.reservation_id == reservation.reservation_id and self._clock() < lease.expires_at:
                lease.remaining += count  # back into the live lease; it is returned when it ends
                return
        await self._clients.quota.ReleaseSendQuota(
            quota_pb2.ReleaseSendQuotaRequest(
                account_id=reservation.account_id, reservation_id=reservation.reservation_id, messages=count
            ),
            timeout=10,
        )

    def _expire(self, account_id: str, lease: _Lease) -> None:
        account = self._accounts.get(account_id)
        if account is None or lease not in account.leases:
            return
        self._spawn(self._return_lease(account_id, account, only=lease))

    async def _return_lease(self, account_id: str, account: _Account, only: _Lease | None = None) -> None:
        """Gives back what is left of the account's leases (with `only`: of that one, if still held)."""
        if only is not None:
            if only not in account.leases:
                return
            account.leases.remove(only)
            leases = [only]
        else:
            leases, account.leases = account.leases, []
        for lease in leases:
            if lease.remaining > 0:
                await self._release_lease(account_id, lease)

    async def _release_lease(self, account_id: str, lease: _Lease) -> None:
        try:
            await self._clients.quota.ReleaseSendQuota(
                quota_pb2.ReleaseSendQuotaRequest(
                    account_id=account_id, reservation_id=lease.reservation_id, messages=lease.remaining
                ),
                timeout=10,
            )
        except aio.AioRpcError as exc:
            # Unreturned messages stay counted as sent: the account loses a little quota, never gains.
            log.warning("could not return a quota lease", extra={"account_id": account_id, "error": str(exc)})

    async def close(self) -> None:
        """Gives back every lease still held (call on shutdown)."""
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        for account_id, account in list(self._accounts.items()):
            await self._return_lease(account_id, account)
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)


def _copy(error: PostmeshError, retry_after: float) -> PostmeshError:
    copy = type(error)(
        error.message,
        reason=error.reason,
        metadata=error.metadata,
        retry_after_seconds=max(retry_after, 0.001),
    )
    return copy
