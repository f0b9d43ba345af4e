"""The domain checker: looks up each domain identity's records and moves its statuses both ways.

A domain is verified while `_postmesh.<domain>` holds its token; its DKIM status follows its keys'
TXT records; its custom MAIL FROM status follows the MX record. A verified domain whose record has
gone is FAILED (and stops signing); a resolver failure never fails a verified domain by itself.
Unverified identities are checked again with exponential backoff, verified ones on a slow schedule.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
from collections.abc import Sequence
from dataclasses import dataclass

from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from postmesh.common.bus import EventPublisher, new_event
from postmesh.common.db import transaction
from postmesh.common.service import Clock
from postmesh.events.v1 import events_pb2
from services.identity.dnslookup import INVALID_VALUE, DnsLookup, Lookup
from services.identity.identities import (
    ACTIVE,
    DOMAIN,
    FAILED,
    NEXT,
    PENDING,
    RETIRED,
    SUCCESS,
    TEMPORARY_FAILURE,
    VERIFICATION_LABEL,
    VERIFICATION_PREFIX,
)
from services.identity.models import DkimKey, EmailIdentity

log = logging.getLogger(__name__)

Change = events_pb2.IdentityChangeType

# While one replica checks an identity, the others leave it alone this long.
CLAIM_SECONDS = 300.0


@dataclass(frozen=True)
class CheckSchedule:
    initial_seconds: float = 60.0
    max_seconds: float = 3600.0
    recheck_seconds: float = 3600.0
    verification_window: dt.timedelta = dt.timedelta(hours=72)

    def retry_delay(self, failures: int) -> float:
        """Backoff after `failures` consecutive unsuccessful checks (1, 2, ...)."""
        return float(min(self.initial_seconds * 2 ** max(failures - 1, 0), self.max_seconds))


def dkim_tags(value: str) -> dict[str, str]:
    tags = {}
    for part in value.split(";"):
        name, sep, tag_value = part.partition("=")
        if sep:
            tags[name.strip().lower()] = "".join(tag_value.split())
    return tags


def _next_status(current: str, found: bool, lookup: Lookup, expired: bool) -> str:
    if found:
        return SUCCESS
    if lookup.transient:
        return current if current in (SUCCESS, FAILED) else TEMPORARY_FAILURE
    if current == SUCCESS:
        return FAILED  # the record is gone
    if current == FAILED or expired:
        return FAILED
    return PENDING


def _significant(before: str, after: str) -> bool:
    """A change that alters what may be sent or signed (PENDING to TEMPORARY_FAILURE does not)."""
    return before != after and (SUCCESS in (before, after) or after == FAILED)


def spf_covers(published: Sequence[str], wanted: str) -> bool:
    """Whether one published SPF record (v=spf1 ...) holds every mechanism of the record postmesh
    asks for (its `all` aside: a stricter or looser default is the domain owner's choice)."""
    mechanisms = {t.lower() for t in wanted.split()[1:] if not t.lower().lstrip("+-~?").startswith("all")}
    for value in published:
        tokens = value.split()
        if tokens and tokens[0].lower() == "v=spf1" and mechanisms <= {t.lower() for t in tokens[1:]}:
            return True
    return False


class DomainVerifier:
    def __init__(
        self,
        sessions: async_sessionmaker[AsyncSession],
        clock: Clock,
        events: EventPublisher,
        dns: DnsLookup,
        schedule: CheckSchedule,
        mail_from_mx_host: str,
        mail_from_spf: str = "",
    ) -> None:
        self._sessions = sessions
        self._clock = clock
        self._events = events
        self._dns = dns
        self._schedule = schedule
        self._mx_host = mail_from_mx_host
        self._spf = mail_from_spf
        self._locks: dict[str, asyncio.Lock] = {}

    async def check(self, identity_id: str) -> None:
        """Checks one domain identity's records now and records the outcome."""
        lock = self._locks.setdefault(identity_id, asyncio.Lock())
        try:
            async with lock:
                await self._check(identity_id)
        finally:
            if not lock.locked():
                self._locks.pop(identity_id, None)

    async def _check(self, identity_id: str) -> None:
        async with self._sessions() as session:
            row = await session.get(EmailIdentity, identity_id)
            if row is None or row.identity_type != DOMAIN:
                return
            keys = (
                await session.scalars(
                    select(DkimKey).where(DkimKey.identity_id == identity_id, DkimKey.state != RETIRED)
                )
            ).all()
            domain, mail_from = row.identity_key, row.mail_from_domain
        # Network lookups happen outside any transaction, so no database lock waits on DNS.
        token_lookup = await self._dns.txt(f"{VERIFICATION_LABEL}.{domain}")
        key_lookups = {k.key_id: await self._dns.txt(f"{k.selector}._domainkey.{domain}") for k in keys}
        mx_lookup = await self._dns.mx(mail_from) if mail_from else None
        spf_lookup = await self._dns.txt(mail_from) if mail_from else None

        now = self._clock.now()
        changes: list[events_pb2.IdentityChangeType.ValueType] = []
        async with transaction(self._sessions) as session:
            row = await session.get(EmailIdentity, identity_id)
            if row is None:
                return
            expired = now - row.created_at > self._schedule.verification_window
            expected = f"{VERIFICATION_PREFIX}{row.verification_token}"
            token_found = any(v.strip() == expected for v in token_lookup.values)
            before = (row.verification_status, row.dkim_status, row.mail_from_status)
            row.verification_status = _next_status(
                row.verification_status, token_found, token_lookup, expired
            )
            row.last_checked_at = now
            if token_found:
                row.last_success_at = now
                row.error_type = row.error_message = ""
            else:
                row.error_type = token_lookup.error or INVALID_VALUE
                row.error_message = (
                    f"{VERIFICATION_LABEL}.{domain} TXT: "
                    + (token_lookup.error or "no record holds the expected token")
                )[:512]

            # DKIM: each key is found when its selector's record carries its public key.
            live = (
                await session.scalars(
                    select(DkimKey).where(DkimKey.identity_id == identity_id, DkimKey.state != RETIRED)
                )
            ).all()
            transient = False
            for key in live:
                lookup = key_lookups.get(key.key_id)
                if lookup is None:
                    continue  # made after the lookups started: the next check covers it
                transient = transient or lookup.transient
                if not lookup.transient:
                    key.found = any(dkim_tags(v).get("p") == key.public_key for v in lookup.values)
            active = [k for k in live if k.state == ACTIVE]
            pending_next = [k for k in live if k.state == NEXT]
            if pending_next and all(k.found for k in pending_next):
                # Rotation completes only once every new record is published: the new keys sign from
                # now on and the old ones stop (their records may stay a while for mail in transit).
                for key in active:
                    key.state = RETIRED
                for key in pending_next:
                    key.state = ACTIVE
                active, pending_next = pending_next, []
                changes.append(Change.IDENTITY_CHANGE_TYPE_DKIM_CHANGED)
            dkim_found = bool(active) and all(k.found for k in active)
            dkim_lookup = Lookup(error="DNS_SERVER_ERROR") if transient else Lookup()
            row.dkim_status = _next_status(row.dkim_status, dkim_found, dkim_lookup, expired)

            if mx_lookup is not None and row.mail_from_domain == mail_from:
                mx_found = self._mx_host in mx_lookup.values
                row.mail_from_status = _next_status(row.mail_from_status, mx_found, mx_lookup, expired)
            if spf_lookup is not None and row.mail_from_domain == mail_from and not spf_lookup.transient:
                row.mail_from_spf_found = spf_covers(spf_lookup.values, self._spf)

            complete = (
                row.verification_status == SUCCESS
                and row.dkim_status == SUCCESS
                and not pending_next
                and row.mail_from_status in ("", SUCCESS)
            )
            if complete or (row.verification_status == FAILED and not pending_next):
                row.check_failures = 0
                delay = self._schedule.recheck_seconds
            else:
                row.check_failures += 1
                delay = self._schedule.retry_delay(row.check_failures)
            row.next_check_at = now + dt.timedelta(seconds=delay)

            after = (row.verification_status, row.dkim_status, row.mail_from_status)
            if before[0] != after[0] and after[0] == SUCCESS:
                changes.append(Change.IDENTITY_CHANGE_TYPE_VERIFIED)
            elif before[0] != after[0] and after[0] == FAILED:
                changes.append(Change.IDENTITY_CHANGE_TYPE_FAILED)
            if _significant(before[1], after[1]) and Change.IDENTITY_CHANGE_TYPE_DKIM_CHANGED not in changes:
                changes.append(Change.IDENTITY_CHANGE_TYPE_DKIM_CHANGED)
            if _significant(before[2], after[2]):
                changes.append(Change.IDENTITY_CHANGE_TYPE_MAIL_FROM_CHANGED)
            account_id, identity, verified = row.account_id, row.identity, row.verification_status == SUCCESS
        for change in changes:
            await self._events.publish(
                new_event(
                    account_id,
                    time=now,
                    identity_changed=events_pb2.IdentityChanged(
                        identity=identity, change_type=change, verified_for_sending=verified
                    ),
                )
            )

    async def _claim_due(self, limit: int = 50) -> list[str]:
        """Identities due for a check, claimed so that other replicas skip them for a while."""
        now = self._clock.now()
        claimed = []
        async with self._sessions() as session:
            due = (
                await session.execute(
                    select(EmailIdentity.identity_id, EmailIdentity.next_check_at)
                    .where(EmailIdentity.identity_type == DOMAIN, EmailIdentity.next_check_at <= now)
                    .order_by(EmailIdentity.next_check_at)
                    .limit(limit)
                )
            ).all()
        for identity_id, next_check_at in due:
            async with transaction(self._sessions) as session:
                result = await session.execute(
                    update(EmailIdentity)
                    .where(
                        EmailIdentity.identity_id == identity_id, EmailIdentity.next_check_at == next_check_at
                    )
                    .values(next_check_at=now + dt.timedelta(seconds=CLAIM_SECONDS))
                )
                if result.rowcount == 1:  # type: ignore[attr-defined]
                    claimed.append(identity_id)
        return claimed

    async def run(self, poll_seconds: float) -> None:
        """The background loop (runtime.spawn restarts it if it fails)."""
        while True:
            for identity_id in await self._claim_due():
                try:
                    await self.check(identity_id)
                except Exception:
                    log.exception("identity check failed", extra={"identity_id": identity_id})
            await asyncio.sleep(poll_seconds)
