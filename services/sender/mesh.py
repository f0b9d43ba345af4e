"""What the sender asks the other services before accepting a message, over gRPC.

The accept path (domain code) sees plain results and domain errors; this adapter is where the other
services' refusals are turned back into domain errors with their status, reason and message intact.

The per-message checks that read (suppression, and sandbox recipients) are coalesced per account:
while one call for an account is in flight, the checks that arrive meanwhile wait and go together in
the next call. Every message is still checked against the current lists, never a kept answer; under
load the other services get one call for many messages instead of one each.

Identity's answers that let a message through (this account may send as this address; this recipient
is verified) are kept for a short while, so a busy account does not ask twice per message. Any
IdentityChanged event (an identity deleted, a policy changed...) drops them all at once; refusals are
never kept. Configuration sets (owned by the feedback service) are kept the same way, dropped on every
ConfigurationSetChanged event; an unknown set is asked again each time.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from typing import Any

from grpc import aio
from nats.aio.client import Client as NATS
from nats.aio.subscription import Subscription

from postmesh.common.addresses import address_key
from postmesh.common.cache import TtlCache
from postmesh.common.clients import MeshClients, domain_error_from, for_account
from postmesh.common.sendquota import Reservation, SendQuotaClient
from postmesh.common.streams import (
    CONFIGURATION_SET_CHANGED_SUBJECT,
    IDENTITY_CHANGED_SUBJECT,
    SUPPRESSION_LIST_CHANGED_SUBJECT,
)
from postmesh.events.v1 import events_pb2
from postmesh.feedback.v1 import configuration_sets_pb2, feedback_pb2
from postmesh.identity.v1 import identity_pb2
from postmesh.sender.v1 import queue_pb2
from services.sender.accept import ALL_SUPPRESSION_REASONS, Authorization, SetOptions

# Internal calls are quick; a stuck peer must not hold a caller's request forever.
TIMEOUT = 10.0
# How long an identity answer is trusted when no IdentityChanged event arrives (one may be missed
# while NATS reconnects).
CACHE_SECONDS = 30.0
_CACHE_LIMIT = 100_000
# Addresses per coalesced check (the services accept up to 1,000).
_BATCH_ADDRESSES = 500


class _Coalesced:
    """Per account, at most one call in flight; checks arriving meanwhile go together in the next.
    `call(account_id, addresses)` returns the address keys it flags (suppressed, unverified)."""

    def __init__(self, call: Callable[[str, list[str]], Awaitable[set[str]]]) -> None:
        self._call = call
        self._waiting: dict[str, list[tuple[list[str], asyncio.Future[set[str]]]]] = {}
        self._drains: set[asyncio.Task[None]] = set()

    async def flagged(self, account_id: str, addresses: list[str]) -> set[str]:
        future: asyncio.Future[set[str]] = asyncio.get_running_loop().create_future()
        waiting = self._waiting.get(account_id)
        if waiting is None:
            waiting = self._waiting[account_id] = []
            drain = asyncio.create_task(self._drain(account_id, waiting))
            self._drains.add(drain)
            drain.add_done_callback(self._drains.discard)
        waiting.append((addresses, future))
        return await future

    async def _drain(
        self, account_id: str, waiting: list[tuple[list[str], asyncio.Future[set[str]]]]
    ) -> None:
        batch: list[tuple[list[str], asyncio.Future[set[str]]]] = []
        try:
            while waiting:
                batch = []
                keys: dict[str, str] = {}
                while waiting and (not batch or len(keys) + len(waiting[0][0]) <= _BATCH_ADDRESSES):
                    addresses, future = waiting.pop(0)
                    batch.append((addresses, future))
                    for address in addresses:
                        keys.setdefault(address_key(address), address)
                try:
                    flagged = await self._call(account_id, list(keys.values()))
                except Exception as exc:
                    for _, future in batch:
                        if not future.done():
                            future.set_exception(exc)
                    continue
                for _, future in batch:
                    if not future.done():
                        future.set_result(flagged)
        finally:
            del self._waiting[account_id]
            for _, future in [*batch, *waiting]:  # left only when this task is cancelled (shutdown)
                if not future.done():
                    future.cancel()


@asynccontextmanager
async def _refusals_as_domain_errors() -> AsyncIterator[None]:
    try:
        yield
    except aio.AioRpcError as exc:
        raise domain_error_from(exc) from None


class MeshChecks:
    def __init__(self, clients: MeshClients, clock: Callable[[], float] = time.monotonic) -> None:
        self._clients = clients
        self._quota = SendQuotaClient(clients)
        self._authorized: TtlCache[tuple[str, str, str], Authorization] = TtlCache(
            CACHE_SECONDS, max_entries=_CACHE_LIMIT, clock=clock
        )
        self._verified: TtlCache[tuple[str, str], bool] = TtlCache(
            CACHE_SECONDS, max_entries=_CACHE_LIMIT, clock=clock
        )
        self._sets: TtlCache[tuple[str, str], SetOptions] = TtlCache(
            CACHE_SECONDS, max_entries=_CACHE_LIMIT, clock=clock
        )
        # Accounts whose suppression list the feedback service found empty, dropped by the
        # SuppressionListChanged event naming them (or after CACHE_SECONDS, should one be missed).
        self._empty_lists: TtlCache[str, bool] = TtlCache(
            CACHE_SECONDS, max_entries=_CACHE_LIMIT, clock=clock
        )
        # Additions heard per account: an answer asked for before one is not kept.
        self._list_changes: dict[str, int] = {}
        self._subscription: Subscription | None = None
        self._set_subscription: Subscription | None = None
        self._suppression_subscription: Subscription | None = None
        self._suppression = _Coalesced(self._check_suppressed)
        self._sandbox = _Coalesced(self._check_verified)

    async def watch(self, nats: NATS) -> None:
        """Drops the kept identity answers on every IdentityChanged event, on every replica (a
        JetStream publish is also a core NATS message)."""

        async def forget(_: Any) -> None:
            self.forget()

        async def forget_sets(_: Any) -> None:
            self._sets.clear()

        async def list_changed(msg: Any) -> None:
            self.suppression_list_changed(events_pb2.Event.FromString(msg.data).account_id)

        self._subscription = await nats.subscribe(IDENTITY_CHANGED_SUBJECT, cb=forget)
        self._set_subscription = await nats.subscribe(CONFIGURATION_SET_CHANGED_SUBJECT, cb=forget_sets)
        self._suppression_subscription = await nats.subscribe(
            SUPPRESSION_LIST_CHANGED_SUBJECT, cb=list_changed
        )

    def suppression_list_changed(self, account_id: str) -> None:
        self._list_changes[account_id] = self._list_changes.get(account_id, 0) + 1
        self._empty_lists.discard(account_id)

    def forget(self) -> None:
        self._authorized.clear()
        self._verified.clear()

    async def close(self) -> None:
        """Gives back quota leases still held (on shutdown)."""
        for subscription in (self._subscription, self._set_subscription, self._suppression_subscription):
            if subscription is not None:
                try:
                    await subscription.unsubscribe()
                except Exception:  # the connection may already be closing
                    pass
        await self._quota.close()

    # reserve and release run for every message: their refusals are turned into domain errors inline,
    # as _refusals_as_domain_errors does, without an async context manager's generator per call.

    async def reserve(self, account_id: str, messages: int) -> Reservation:
        try:
            return await self._quota.reserve(account_id, messages)
        except aio.AioRpcError as exc:
            raise domain_error_from(exc) from None

    async def release(self, reservation: Reservation, messages: int) -> None:
        try:
            await self._quota.release(reservation, messages)
        except aio.AioRpcError as exc:
            raise domain_error_from(exc) from None

    async def authorize_sender(self, account_id: str, address: str, identity: str) -> Authorization:
        key = (account_id, address.lower(), identity)
        kept = self._authorized.get(key)
        if kept is not None:
            return kept
        async with _refusals_as_domain_errors():
            reply = await self._clients.identity.AuthorizeSender(
                identity_pb2.AuthorizeSenderRequest(
                    account_id=account_id, from_address=address, from_identity=identity
                ),
                timeout=TIMEOUT,
            )
        authorization = Authorization(
            reply.identity,
            reply.identity_owner_account_id,
            reply.mail_from_domain,
            reply.feedback_forwarding_enabled,
            reply.default_configuration_set_name,
        )
        self._authorized.put(key, authorization)
        return authorization

    async def unverified_recipients(self, account_id: str, addresses: list[str]) -> list[str]:
        unknown = [a for a in addresses if self._verified.get((account_id, a.lower())) is None]
        if not unknown:
            return []
        unverified = await self._sandbox.flagged(account_id, unknown)
        return [a for a in unknown if address_key(a) in unverified]

    async def _check_verified(self, account_id: str, addresses: list[str]) -> set[str]:
        async with _refusals_as_domain_errors():
            reply = await self._clients.identity.CheckVerifiedRecipients(
                identity_pb2.CheckVerifiedRecipientsRequest(account_id=account_id, email_addresses=addresses),
                timeout=TIMEOUT,
            )
        unverified = set(reply.unverified)
        for address in addresses:
            if address not in unverified:
                self._verified.put((account_id, address.lower()), True)
        return {address_key(a) for a in unverified}

    async def suppressed(
        self, account_id: str, addresses: list[str], reasons: Sequence[str] = ALL_SUPPRESSION_REASONS
    ) -> list[str]:
        if self._empty_lists.get(account_id):
            return []
        suppressed = await self._suppression.flagged(account_id, addresses)
        return [a for a in addresses if any(_flag(address_key(a), r) in suppressed for r in reasons)]

    async def configuration_set(self, account_id: str, name: str) -> SetOptions:
        kept = self._sets.get((account_id, name))
        if kept is not None:
            return kept
        async with _refusals_as_domain_errors():
            reply = await self._clients.feedback.GetConfigurationSet(
                configuration_sets_pb2.GetConfigurationSetRequest(configuration_set_name=name),
                metadata=for_account(account_id),
                timeout=TIMEOUT,
            )
            # SES tracks opens and clicks for a set that publishes them somewhere.
            destinations = await self._clients.feedback.GetConfigurationSetEventDestinations(
                configuration_sets_pb2.GetConfigurationSetEventDestinationsRequest(
                    configuration_set_name=name
                ),
                metadata=for_account(account_id),
                timeout=TIMEOUT,
            )
        tracked = {
            event_type
            for destination in destinations.event_destinations
            if destination.enabled
            for event_type in destination.matching_event_types
        }
        found = reply.configuration_set
        options = SetOptions(
            sending_enabled=found.sending_options.sending_enabled,
            tls_policy=found.delivery_options.tls_policy or queue_pb2.TLS_POLICY_OPTIONAL,
            max_delivery_seconds=int(found.delivery_options.max_delivery_seconds),
            suppressed_reasons=(
                tuple(found.suppression_options.suppressed_reasons)
                if found.HasField("suppression_options")
                else ALL_SUPPRESSION_REASONS
            ),
            spam_policy=found.filtration_options.spam_policy,
            track_opens=events_pb2.EMAIL_EVENT_TYPE_OPEN in tracked,
            track_clicks=events_pb2.EMAIL_EVENT_TYPE_CLICK in tracked,
            custom_redirect_domain=found.tracking_options.custom_redirect_domain,
        )
        self._sets.put((account_id, name), options)
        return options

    async def _check_suppressed(self, account_id: str, addresses: list[str]) -> set[str]:
        changes = self._list_changes.get(account_id, 0)
        async with _refusals_as_domain_errors():
            reply = await self._clients.feedback.CheckSuppressedDestinations(
                feedback_pb2.CheckSuppressedDestinationsRequest(
                    account_id=account_id, email_addresses=addresses
                ),
                timeout=TIMEOUT,
            )
        if reply.list_empty and self._list_changes.get(account_id, 0) == changes:
            self._empty_lists.put(account_id, True)
        # Each flag names the reason too, so a configuration set's own reasons can be applied.
        return {
            _flag(address_key(s.email_address), feedback_pb2.SuppressionListReason.Name(s.reason))
            for s in reply.suppressed
        }


def _flag(key: str, reason: str) -> str:
    return f"{key} {reason.removeprefix('SUPPRESSION_LIST_REASON_')}"
