"""Email address and domain identities of accounts (domain code: no gRPC here).

An account may send from an address when the address, or its domain (or a parent domain), is a
verified identity of the account, or of another account whose sending authorization policy names it.
A domain name may be an identity of several accounts; nothing (token, keys, status) is shared.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import re
import secrets
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from sqlalchemy import delete, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from postmesh.common.addresses import address_key, domain_of, normalize_address, normalize_domain
from postmesh.common.bus import EventPublisher, new_event
from postmesh.common.db import transaction
from postmesh.common.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
)
from postmesh.common.paging import keyset_page, split_page
from postmesh.common.service import Clock
from postmesh.events.v1 import events_pb2
from services.identity import dkimkeys, policies
from services.identity.accesskeys import rewrap_access_keys
from services.identity.accounts import SYSTEM_ACCOUNT_ID
from services.identity.dkimkeys import MasterKeys, Sealed
from services.identity.models import Account, DkimKey, EmailIdentity, IdentityPolicy, VerificationToken

ADDRESS = "EMAIL_ADDRESS"
DOMAIN = "DOMAIN"

PENDING = "PENDING"
SUCCESS = "SUCCESS"
FAILED = "FAILED"
TEMPORARY_FAILURE = "TEMPORARY_FAILURE"
NOT_STARTED = "NOT_STARTED"

# DKIM key states.
ACTIVE = "ACTIVE"
NEXT = "NEXT"
RETIRED = "RETIRED"

# Who made the DKIM keys.
EASY_DKIM = "POSTMESH"
BYODKIM = "EXTERNAL"

USE_DEFAULT_VALUE = "USE_DEFAULT_VALUE"
REJECT_MESSAGE = "REJECT_MESSAGE"


VERIFICATION_LABEL = "_postmesh"
VERIFICATION_PREFIX = "postmesh-verification="

_SELECTOR = re.compile(r"^(?!-)[a-z0-9-]{1,63}(?<!-)$")
_ARN = re.compile(r"^arn:[^:]*:ses:[^:]*:(\d{12}):identity/(.+)$")

Change = events_pb2.IdentityChangeType


@dataclass(frozen=True)
class IdentityConfig:
    token_ttl: dt.timedelta = dt.timedelta(hours=24)
    resend_interval: dt.timedelta = dt.timedelta(seconds=60)
    mail_from_mx_host: str = "feedback-smtp.postmesh.test"
    mail_from_spf: str = "v=spf1 include:spf.postmesh.test ~all"
    system_address: str = "no-reply@postmesh.test"
    feedback_forwarding_default: bool = True

    @classmethod
    def from_settings(cls, settings: Any) -> IdentityConfig:
        return cls(
            token_ttl=dt.timedelta(hours=settings.verification_token_hours),
            resend_interval=dt.timedelta(seconds=settings.verification_resend_seconds),
            mail_from_mx_host=settings.mail_from_mx_host.rstrip(".").lower(),
            mail_from_spf=settings.mail_from_spf,
            system_address=settings.verification_mail_from,
            feedback_forwarding_default=settings.feedback_forwarding_default,
        )


@dataclass(frozen=True)
class DkimRequest:
    """What CreateEmailIdentity or PutEmailIdentityDkimSigningAttributes ask of DKIM."""

    selector: str = ""
    private_key: str = ""
    rsa_bits: int = 0
    include_ed25519: bool = False

    @property
    def byo(self) -> bool:
        return bool(self.selector or self.private_key)


@dataclass(frozen=True)
class Record:
    name: str
    type: str
    value: str
    purpose: str
    found: bool


@dataclass
class IdentityView:
    identity: EmailIdentity
    keys: list[DkimKey]
    policies: dict[str, str]
    status: str
    verified_for_sending: bool
    token_expires_at: dt.datetime | None
    records: list[Record] = field(default_factory=list)
    feedback_forwarding: bool = True


@dataclass(frozen=True)
class SenderAuthorization:
    identity: str
    owner_account_id: str
    mail_from_domain: str
    feedback_forwarding: bool = False
    # The identity's default configuration set (own identities only: sets belong to one account).
    configuration_set: str = ""


@dataclass(frozen=True)
class SigningKey:
    selector: str
    algorithm: str
    private_pem: str


class Mailer(Protocol):
    async def send_verification(self, address: str, token: str, expires_at: dt.datetime) -> None: ...


class Verifier(Protocol):
    async def check(self, identity_id: str) -> None: ...


def parse_identity(name: str, *, field: str = "email_identity") -> tuple[str, str, str]:
    """(stored form, comparison key, type) of an address or domain; INVALID_ARGUMENT otherwise."""
    if not name.strip():
        raise InvalidArgument(f"{field} is required.", field=field)
    if "@" in name:
        address = normalize_address(name, field=field)
        return address, address_key(address), ADDRESS
    domain = normalize_domain(name, field=field)
    return domain, domain, DOMAIN


def parent_domains(domain: str) -> list[str]:
    """The domain and each parent with at least two labels, most specific first."""
    labels = domain.split(".")
    return [".".join(labels[i:]) for i in range(len(labels) - 1)]


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def _sealed(key: DkimKey) -> Sealed:
    return Sealed(key.encrypted_private_key, key.wrapped_data_key, key.master_key_id)


def _key_bits(request_bits: int, default: int) -> int:
    bits = request_bits or default or 2048
    if bits not in (1024, 2048):
        raise InvalidArgument("next_signing_key_length must be RSA_1024_BIT or RSA_2048_BIT.", field="dkim")
    return bits


class IdentityStore:
    def __init__(
        self,
        sessions: async_sessionmaker[AsyncSession],
        clock: Clock,
        events: EventPublisher,
        master_keys: MasterKeys,
        config: IdentityConfig,
        mailer: Mailer,
        verifier: Verifier,
    ) -> None:
        self._sessions = sessions
        self._clock = clock
        self._events = events
        self._master_keys = master_keys
        self.config = config
        self._mailer = mailer
        self._verifier = verifier

    # --- events

    async def _announce(
        self, account_id: str, identity: str, change: events_pb2.IdentityChangeType.ValueType, verified: bool
    ) -> None:
        await self._events.publish(
            new_event(
                account_id,
                time=self._clock.now(),
                identity_changed=events_pb2.IdentityChanged(
                    identity=identity, change_type=change, verified_for_sending=verified
                ),
            )
        )

    # --- lookups

    async def _owned(self, session: AsyncSession, account_id: str, name: str) -> EmailIdentity:
        _, key, _ = parse_identity(name)
        row = await session.scalar(
            select(EmailIdentity).where(
                EmailIdentity.account_id == account_id, EmailIdentity.identity_key == key
            )
        )
        if row is None:
            # Another account's identity of the same name is reported exactly like a missing one.
            raise NotFound(f"Email identity {name.strip()} does not exist.")
        return row

    async def _owned_domain(self, session: AsyncSession, account_id: str, name: str) -> EmailIdentity:
        row = await self._owned(session, account_id, name)
        if row.identity_type != DOMAIN:
            raise InvalidArgument(
                f"{row.identity} is an email address identity; this applies to domain identities.",
                field="email_identity",
            )
        return row

    async def _verified_domains(
        self, session: AsyncSession, account_id: str, names: Iterable[str]
    ) -> set[str]:
        candidates = {d for name in names for d in parent_domains(name)}
        if not candidates:
            return set()
        rows = await session.scalars(
            select(EmailIdentity.identity_key).where(
                EmailIdentity.account_id == account_id,
                EmailIdentity.identity_type == DOMAIN,
                EmailIdentity.verification_status == SUCCESS,
                EmailIdentity.identity_key.in_(candidates),
            )
        )
        return set(rows.all())

    def _address_status(self, row: EmailIdentity, covered: bool, expires_at: dt.datetime | None) -> str:
        if row.verification_status == SUCCESS or covered:
            return SUCCESS
        if row.verification_status == PENDING:
            if expires_at is None:
                return NOT_STARTED  # made while its domain was verified: no message was ever sent
            if expires_at <= self._clock.now():
                return FAILED  # every confirmation link has expired
        return row.verification_status

    async def _view(self, session: AsyncSession, row: EmailIdentity) -> IdentityView:
        keys = list(
            (
                await session.scalars(
                    select(DkimKey).where(DkimKey.identity_id == row.identity_id).order_by(DkimKey.created_at)
                )
            ).all()
        )
        policy_rows = (
            await session.scalars(select(IdentityPolicy).where(IdentityPolicy.identity_id == row.identity_id))
        ).all()
        policy_map = {p.policy_name: p.policy for p in policy_rows}
        expires_at = None
        if row.identity_type == ADDRESS:
            expires_at = await session.scalar(
                select(VerificationToken.expires_at)
                .where(VerificationToken.identity_id == row.identity_id, VerificationToken.used_at.is_(None))
                .order_by(VerificationToken.expires_at.desc())
                .limit(1)
            )
            covered = bool(
                await self._verified_domains(session, row.account_id, [domain_of(row.identity_key)])
            )
            status = self._address_status(row, covered, expires_at)
            verified = status == SUCCESS
        else:
            status = row.verification_status
            verified = status == SUCCESS
        view = IdentityView(row, keys, policy_map, status, verified, expires_at)
        view.records = self.records(row, keys)
        view.feedback_forwarding = self.feedback_forwarding(row)
        return view

    def records(self, row: EmailIdentity, keys: Sequence[DkimKey]) -> list[Record]:
        """Every DNS record the owner of a domain identity publishes."""
        if row.identity_type != DOMAIN:
            return []
        domain = row.identity_key
        records = [
            Record(
                f"{VERIFICATION_LABEL}.{domain}",
                "TXT",
                f"{VERIFICATION_PREFIX}{row.verification_token}",
                "verification",
                row.verification_status == SUCCESS,
            )
        ]
        for key in keys:
            if key.state != RETIRED:
                records.append(
                    Record(
                        f"{key.selector}._domainkey.{domain}",
                        "TXT",
                        dkimkeys.dns_value(key.algorithm, key.public_key),
                        "dkim",
                        key.found,
                    )
                )
        if row.mail_from_domain:
            ok = row.mail_from_status == SUCCESS
            records.append(
                Record(row.mail_from_domain, "MX", f"10 {self.config.mail_from_mx_host}", "mail-from", ok)
            )
            records.append(
                Record(
                    row.mail_from_domain,
                    "TXT",
                    self.config.mail_from_spf,
                    "mail-from",
                    row.mail_from_spf_found,
                )
            )
        return records

    # --- key material

    async def _new_keys(self, identity_id: str, request: DkimRequest, default_bits: int) -> list[DkimKey]:
        now = self._clock.now()
        if request.byo:
            selector = request.selector.strip().lower()
            if not _SELECTOR.match(selector):
                raise InvalidArgument(
                    "domain_signing_selector must be a DNS label (letters, digits, dashes).",
                    field="domain_signing_selector",
                )
            materials = [(selector, dkimkeys.import_private_key(request.private_key))]
        else:
            bits = _key_bits(request.rsa_bits, default_bits)
            algorithms = [dkimkeys.RSA] + ([dkimkeys.ED25519] if request.include_ed25519 else [])
            materials = []
            for algorithm in algorithms:
                # RSA key generation takes a noticeable fraction of a second: keep the loop free.
                material = await asyncio.to_thread(dkimkeys.generate, algorithm, bits)
                materials.append((dkimkeys.new_selector(), material))
        keys = []
        for selector, material in materials:
            key_id = secrets.token_hex(16)
            sealed = self._master_keys.seal(key_id, material.private_pem)
            keys.append(
                DkimKey(
                    key_id=key_id,
                    identity_id=identity_id,
                    selector=selector,
                    algorithm=material.algorithm,
                    key_bits=material.key_bits,
                    state=ACTIVE,
                    public_key=material.public_key,
                    encrypted_private_key=sealed.encrypted_private_key,
                    wrapped_data_key=sealed.wrapped_data_key,
                    master_key_id=sealed.master_key_id,
                    found=False,
                    created_at=now,
                )
            )
        return keys

    # --- CRUD

    async def create(
        self, account_id: str, name: str, dkim: DkimRequest, *, announce: bool = True
    ) -> IdentityView:
        stored, key, kind = parse_identity(name)
        if kind == ADDRESS and (dkim.byo or dkim.rsa_bits or dkim.include_ed25519):
            raise InvalidArgument(
                "DKIM signing attributes apply to domain identities only.", field="dkim_signing_attributes"
            )
        async with self._sessions() as session:
            # Checked again in the transaction below; this spares generating keys for nothing.
            if await self._exists(session, account_id, key):
                raise AlreadyExists(f"Email identity {stored} already exists.", reason="ALREADY_EXISTS")
        identity_id = secrets.token_hex(16)
        keys = await self._new_keys(identity_id, dkim, 2048) if kind == DOMAIN else []
        now = self._clock.now()
        token = ""
        expires_at = now + self.config.token_ttl
        try:
            async with transaction(self._sessions) as session:
                if await self._exists(session, account_id, key):
                    raise AlreadyExists(f"Email identity {stored} already exists.", reason="ALREADY_EXISTS")
                row = EmailIdentity(
                    identity_id=identity_id,
                    account_id=account_id,
                    identity=stored,
                    identity_key=key,
                    identity_type=kind,
                    verification_status=PENDING,
                    verification_token="",
                    created_at=now,
                    check_failures=0,
                    error_type="",
                    error_message="",
                    dkim_signing_enabled=kind == DOMAIN,
                    dkim_origin="",
                    dkim_status=NOT_STARTED,
                    dkim_next_key_bits=2048,
                    mail_from_domain="",
                    mail_from_status="",
                    mail_from_behavior=USE_DEFAULT_VALUE,
                )
                if kind == DOMAIN:
                    row.verification_token = secrets.token_urlsafe(24)
                    row.next_check_at = now
                    row.dkim_origin = BYODKIM if dkim.byo else EASY_DKIM
                    row.dkim_status = PENDING
                    row.dkim_next_key_bits = _key_bits(dkim.rsa_bits, 2048) if not dkim.byo else 2048
                    row.dkim_generated_at = now
                session.add(row)
                await session.flush()
                session.add_all(keys)
                if kind == ADDRESS:
                    covered = await self._verified_domains(session, account_id, [domain_of(key)])
                    # Covered by its verified domain, it needs no message; it is verified while the
                    # domain is (its own status stays PENDING, so the domain failing un-verifies it).
                    if not covered:
                        token = self._add_token(session, identity_id, now, expires_at)
                        row.last_email_sent_at = now
                        # Queued inside the transaction: if queuing fails, nothing was created.
                        await self._mailer.send_verification(stored, token, expires_at)
                view = await self._view(session, row)
        except IntegrityError:
            raise AlreadyExists(f"Email identity {stored} already exists.", reason="ALREADY_EXISTS") from None
        if announce:
            await self._announce(
                account_id, stored, Change.IDENTITY_CHANGE_TYPE_CREATED, view.verified_for_sending
            )
        return view

    async def _exists(self, session: AsyncSession, account_id: str, key: str) -> bool:
        found = await session.scalar(
            select(EmailIdentity.identity_id).where(
                EmailIdentity.account_id == account_id, EmailIdentity.identity_key == key
            )
        )
        return found is not None

    def _add_token(
        self, session: AsyncSession, identity_id: str, now: dt.datetime, expires_at: dt.datetime
    ) -> str:
        token = secrets.token_urlsafe(32)
        session.add(
            VerificationToken(
                token_hash=token_hash(token), identity_id=identity_id, created_at=now, expires_at=expires_at
            )
        )
        return token

    async def get(self, account_id: str, name: str) -> IdentityView:
        async with self._sessions() as session:
            return await self._view(session, await self._owned(session, account_id, name))

    async def get_by_id(self, identity_id: str) -> IdentityView:
        async with self._sessions() as session:
            row = await session.get(EmailIdentity, identity_id)
            if row is None:
                raise NotFound("The email identity no longer exists.")
            return await self._view(session, row)

    async def list_identities(
        self, account_id: str, page_size: int, page_token: str
    ) -> tuple[list[tuple[EmailIdentity, str, bool]], str]:
        query = select(EmailIdentity).where(EmailIdentity.account_id == account_id)
        statement, size = keyset_page(query, EmailIdentity.identity_key, page_size, page_token)
        async with self._sessions() as session:
            rows, token = split_page((await session.scalars(statement)).all(), size, lambda r: r.identity_key)
            addresses = [r for r in rows if r.identity_type == ADDRESS]
            covered = await self._verified_domains(
                session, account_id, [domain_of(r.identity_key) for r in addresses]
            )
            expiries: dict[str, dt.datetime] = {}
            if addresses:
                for identity_id, expires_at in (
                    await session.execute(
                        select(VerificationToken.identity_id, VerificationToken.expires_at).where(
                            VerificationToken.identity_id.in_([r.identity_id for r in addresses]),
                            VerificationToken.used_at.is_(None),
                        )
                    )
                ).all():
                    if identity_id not in expiries or expires_at > expiries[identity_id]:
                        expiries[identity_id] = expires_at
        items = []
        for row in rows:
            if row.identity_type == ADDRESS:
                is_covered = any(d in covered for d in parent_domains(domain_of(row.identity_key)))
                status = self._address_status(row, is_covered, expiries.get(row.identity_id))
            else:
                status = row.verification_status
            items.append((row, status, status == SUCCESS))
        return items, token

    async def delete(self, account_id: str, name: str) -> None:
        async with transaction(self._sessions) as session:
            row = await self._owned(session, account_id, name)
            stored = row.identity
            # Children go by ON DELETE CASCADE; deleted explicitly too so no backend setting matters.
            for table in (DkimKey, VerificationToken, IdentityPolicy):
                await session.execute(delete(table).where(table.identity_id == row.identity_id))
            await session.delete(row)
        await self._announce(account_id, stored, Change.IDENTITY_CHANGE_TYPE_DELETED, False)

    # --- address verification

    async def confirm(self, token: str) -> tuple[str, str]:
        """Marks the address identity behind a token verified: (identity, account id)."""
        token = token.strip()
        if not token or len(token) > 128:
            raise InvalidArgument("token is required.", field="token")
        now = self._clock.now()
        async with transaction(self._sessions) as session:
            record = await session.get(VerificationToken, token_hash(token))
            if record is None:
                raise InvalidArgument(
                    "This confirmation link is not valid (or its identity was deleted).",
                    field="token",
                    reason="INVALID_TOKEN",
                )
            if record.used_at is not None:
                raise FailedPrecondition(
                    "This confirmation link has already been used.", reason="TOKEN_ALREADY_USED"
                )
            if record.expires_at <= now:
                raise FailedPrecondition(
                    "This confirmation link has expired; ask for a new verification message.",
                    reason="TOKEN_EXPIRED",
                )
            row = await session.get(EmailIdentity, record.identity_id)
            assert row is not None  # the token row would be gone with it
            # Single use: this token and any other outstanding one for the identity.
            await session.execute(
                update(VerificationToken)
                .where(VerificationToken.identity_id == row.identity_id, VerificationToken.used_at.is_(None))
                .values(used_at=now)
            )
            row.verification_status = SUCCESS
            row.last_success_at = now
            identity, account_id = row.identity, row.account_id
        await self._announce(account_id, identity, Change.IDENTITY_CHANGE_TYPE_VERIFIED, True)
        return identity, account_id

    async def resend(self, account_id: str, name: str) -> dt.datetime:
        now = self._clock.now()
        async with transaction(self._sessions) as session:
            row = await self._owned(session, account_id, name)
            if row.identity_type != ADDRESS:
                raise InvalidArgument(
                    "Domains are verified through DNS; use CheckEmailIdentityVerification.",
                    field="email_identity",
                )
            if row.verification_status == SUCCESS:
                raise FailedPrecondition(f"{row.identity} is already verified.", reason="ALREADY_VERIFIED")
            if row.last_email_sent_at is not None:
                wait = row.last_email_sent_at + self.config.resend_interval - now
                if wait > dt.timedelta(0):
                    raise ResourceExhausted(
                        "A verification message was sent moments ago; wait before asking for another.",
                        reason="TOO_MANY_REQUESTS",
                        retry_after_seconds=max(1.0, wait.total_seconds()),
                    )
            expires_at = now + self.config.token_ttl
            token = self._add_token(session, row.identity_id, now, expires_at)
            row.verification_status = PENDING
            row.last_email_sent_at = now
            await self._mailer.send_verification(row.identity, token, expires_at)
        return expires_at

    # --- domain verification

    async def check_now(self, account_id: str, name: str) -> IdentityView:
        async with self._sessions() as session:
            row = await self._owned_domain(session, account_id, name)
        await self._verifier.check(row.identity_id)
        return await self.get_by_id(row.identity_id)

    # --- DKIM

    async def put_dkim_signing_enabled(self, account_id: str, name: str, enabled: bool) -> None:
        async with transaction(self._sessions) as session:
            row = await self._owned_domain(session, account_id, name)
            changed = row.dkim_signing_enabled != enabled
            row.dkim_signing_enabled = enabled
            identity, verified = row.identity, row.verification_status == SUCCESS
        if changed:
            await self._announce(account_id, identity, Change.IDENTITY_CHANGE_TYPE_DKIM_CHANGED, verified)

    async def put_dkim_signing_attributes(
        self, account_id: str, name: str, origin: str, request: DkimRequest
    ) -> IdentityView:
        if origin not in (EASY_DKIM, BYODKIM):
            raise InvalidArgument(
                "signing_attributes_origin must be POSTMESH or EXTERNAL.", field="signing_attributes_origin"
            )
        if origin == BYODKIM and not (request.selector and request.private_key):
            raise InvalidArgument(
                "EXTERNAL signing needs domain_signing_selector and domain_signing_private_key.",
                field="signing_attributes",
            )
        if origin == EASY_DKIM and request.byo:
            raise InvalidArgument(
                "Easy DKIM (POSTMESH) takes no selector or private key.", field="signing_attributes"
            )
        async with self._sessions() as session:
            current = await self._owned_domain(session, account_id, name)
        bits = _key_bits(request.rsa_bits, current.dkim_next_key_bits)
        regenerate = origin == BYODKIM or current.dkim_origin != EASY_DKIM or request.include_ed25519
        keys = await self._new_keys(current.identity_id, request, bits) if regenerate else []
        now = self._clock.now()
        async with transaction(self._sessions) as session:
            row = await self._owned_domain(session, account_id, name)
            row.dkim_next_key_bits = bits
            if regenerate:
                signing = (
                    await session.scalars(
                        select(DkimKey.key_id).where(
                            DkimKey.identity_id == row.identity_id,
                            DkimKey.state == ACTIVE,
                            DkimKey.found.is_(True),
                        )
                    )
                ).all()
                if signing and row.dkim_status == SUCCESS:
                    # A live domain (switching to its own key, or back to Easy DKIM): the new keys
                    # wait as the next ones, as in a rotation, and the current ones keep signing
                    # until every new record is found in DNS; mail never goes out unsigned meanwhile.
                    await session.execute(
                        delete(DkimKey).where(DkimKey.identity_id == row.identity_id, DkimKey.state != ACTIVE)
                    )
                    for key in keys:
                        key.state = NEXT
                else:
                    await session.execute(delete(DkimKey).where(DkimKey.identity_id == row.identity_id))
                    row.dkim_status = PENDING
                session.add_all(keys)
                row.dkim_origin = origin
                row.dkim_generated_at = now
                row.next_check_at = now
                row.check_failures = 0
            await session.flush()
            view = await self._view(session, row)
        await self._announce(
            account_id,
            view.identity.identity,
            Change.IDENTITY_CHANGE_TYPE_DKIM_CHANGED,
            view.verified_for_sending,
        )
        return view

    async def rotate_dkim(self, account_id: str, name: str, rsa_bits: int) -> IdentityView:
        async with self._sessions() as session:
            current = await self._owned_domain(session, account_id, name)
            active = (
                await session.scalars(
                    select(DkimKey).where(
                        DkimKey.identity_id == current.identity_id, DkimKey.state != RETIRED
                    )
                )
            ).all()
        if current.dkim_origin != EASY_DKIM:
            raise FailedPrecondition(
                "This domain signs with its own key (BYODKIM): import a new one with "
                "PutEmailIdentityDkimSigningAttributes.",
                reason="BYODKIM_IN_USE",
            )
        if any(k.state == NEXT for k in active):
            raise FailedPrecondition(
                "A key rotation is already waiting for its DNS records; publish them first.",
                reason="ROTATION_IN_PROGRESS",
            )
        bits = _key_bits(rsa_bits, current.dkim_next_key_bits)
        wants_ed25519 = any(k.algorithm == dkimkeys.ED25519 for k in active)
        keys = await self._new_keys(
            current.identity_id, DkimRequest(rsa_bits=bits, include_ed25519=wants_ed25519), bits
        )
        now = self._clock.now()
        for key in keys:
            key.state = NEXT
        async with transaction(self._sessions) as session:
            row = await self._owned_domain(session, account_id, name)
            # Keys retired by an earlier rotation go now: their records may be removed by the owner.
            await session.execute(
                delete(DkimKey).where(DkimKey.identity_id == row.identity_id, DkimKey.state == RETIRED)
            )
            session.add_all(keys)
            row.dkim_next_key_bits = bits
            row.dkim_generated_at = now
            row.next_check_at = now
            row.check_failures = 0
            await session.flush()
            view = await self._view(session, row)
        await self._announce(
            account_id,
            view.identity.identity,
            Change.IDENTITY_CHANGE_TYPE_DKIM_CHANGED,
            view.verified_for_sending,
        )
        return view

    async def rewrap_keys(self) -> tuple[str, int, int]:
        """Re-encrypts every data key under the current master key, all or nothing."""
        rewrapped = current = 0
        async with transaction(self._sessions) as session:
            for key in (await session.scalars(select(DkimKey))).all():
                if key.master_key_id == self._master_keys.current_id:
                    current += 1
                    continue
                key.wrapped_data_key = self._master_keys.rewrap(
                    key.key_id, key.wrapped_data_key, key.master_key_id
                )
                key.master_key_id = self._master_keys.current_id
                rewrapped += 1
            # SigV4 access keys are sealed under the same master keys.
            more, more_current = await rewrap_access_keys(session, self._master_keys)
        return self._master_keys.current_id, rewrapped + more, current + more_current

    # --- custom MAIL FROM

    async def put_mail_from(self, account_id: str, name: str, mail_from: str, behavior: str) -> IdentityView:
        behavior = behavior or USE_DEFAULT_VALUE
        if behavior not in (USE_DEFAULT_VALUE, REJECT_MESSAGE):
            raise InvalidArgument(
                "behavior_on_mx_failure must be USE_DEFAULT_VALUE or REJECT_MESSAGE.",
                field="behavior_on_mx_failure",
            )
        async with transaction(self._sessions) as session:
            row = await self._owned_domain(session, account_id, name)
            if mail_from.strip():
                domain = normalize_domain(mail_from, field="mail_from_domain")
                if not domain.endswith("." + row.identity_key):
                    raise InvalidArgument(
                        f"The MAIL FROM domain must be a subdomain of {row.identity_key}.",
                        field="mail_from_domain",
                    )
                if domain != row.mail_from_domain:
                    row.mail_from_status = PENDING
                    row.mail_from_spf_found = False
                    row.next_check_at = self._clock.now()
                    row.check_failures = 0
                row.mail_from_domain = domain
                row.mail_from_behavior = behavior
            else:
                row.mail_from_domain = ""
                row.mail_from_status = ""
                row.mail_from_spf_found = False
                row.mail_from_behavior = USE_DEFAULT_VALUE
            await session.flush()
            view = await self._view(session, row)
        await self._announce(
            account_id,
            view.identity.identity,
            Change.IDENTITY_CHANGE_TYPE_MAIL_FROM_CHANGED,
            view.verified_for_sending,
        )
        return view

    async def mail_from_domain_in_use(self, domain: str) -> bool:
        """Whether a verified domain identity (of any account) has `domain` as its custom MAIL FROM
        domain. Its status does not matter: bounces of mail sent while it was verified come later."""
        key = normalize_domain(domain, field="domain")
        async with self._sessions() as session:
            found = await session.scalar(
                select(EmailIdentity.identity_id)
                .where(
                    EmailIdentity.mail_from_domain == key,
                    EmailIdentity.identity_type == DOMAIN,
                    EmailIdentity.verification_status == SUCCESS,
                )
                .limit(1)
            )
        return found is not None

    # --- email feedback forwarding

    def feedback_forwarding(self, row: EmailIdentity) -> bool:
        if row.feedback_forwarding is None:
            return self.config.feedback_forwarding_default
        return bool(row.feedback_forwarding)

    async def put_feedback_forwarding(self, account_id: str, name: str, enabled: bool) -> None:
        async with transaction(self._sessions) as session:
            row = await self._owned(session, account_id, name)
            row.feedback_forwarding = enabled
            await session.flush()
            view = await self._view(session, row)
        await self._announce(
            account_id,
            view.identity.identity,
            Change.IDENTITY_CHANGE_TYPE_FEEDBACK_CHANGED,
            view.verified_for_sending,
        )

    async def put_configuration_set(self, account_id: str, name: str, configuration_set: str) -> None:
        """The identity's default configuration set ("" removes it); the caller checked that it exists."""
        async with transaction(self._sessions) as session:
            row = await self._owned(session, account_id, name)
            row.configuration_set_name = configuration_set
            identity, verified = row.identity, row.verification_status == SUCCESS
        await self._announce(
            account_id, identity, Change.IDENTITY_CHANGE_TYPE_CONFIGURATION_SET_CHANGED, verified
        )

    # --- SES v1 identity notifications

    async def set_notification_destination(
        self, account_id: str, name: str, kind: str, destination: str
    ) -> None:
        """`destination` ("<set>/<destination>", or "" for none) was checked by the caller."""
        column = _notification_kind(kind) + "_destination"
        async with transaction(self._sessions) as session:
            row = await self._owned(session, account_id, name)
            if not destination and kind in ("BOUNCE", "COMPLAINT") and not self.feedback_forwarding(row):
                raise InvalidArgument(
                    "Feedback forwarding is disabled: bounce and complaint notifications need a destination "
                    "(enable feedback forwarding first).",
                    field="destination",
                )
            setattr(row, column, destination)
            identity = row.identity
        await self._announce(account_id, identity, Change.IDENTITY_CHANGE_TYPE_NOTIFICATIONS_CHANGED, True)

    async def set_headers_in_notifications(
        self, account_id: str, name: str, kind: str, enabled: bool
    ) -> None:
        column = "headers_in_" + _notification_kind(kind)
        async with transaction(self._sessions) as session:
            row = await self._owned(session, account_id, name)
            setattr(row, column, enabled)
            identity = row.identity
        await self._announce(account_id, identity, Change.IDENTITY_CHANGE_TYPE_NOTIFICATIONS_CHANGED, True)

    async def set_feedback_forwarding(self, account_id: str, name: str, enabled: bool) -> None:
        async with transaction(self._sessions) as session:
            row = await self._owned(session, account_id, name)
            if not enabled and not (row.bounce_destination and row.complaint_destination):
                raise InvalidArgument(
                    "Feedback forwarding can be disabled only when bounce and complaint notifications have "
                    "a destination.",
                    field="forwarding_enabled",
                )
            row.feedback_forwarding = enabled
            identity = row.identity
        await self._announce(account_id, identity, Change.IDENTITY_CHANGE_TYPE_NOTIFICATIONS_CHANGED, True)

    async def notification_settings(self, account_id: str, names: Sequence[str]) -> list[EmailIdentity]:
        """The account's identities among `names` (others are left out, as SES does)."""
        keys = []
        for name in names:
            try:
                keys.append(parse_identity(name)[1])
            except InvalidArgument:
                continue
        if not keys:
            return []
        async with self._sessions() as session:
            return list(
                await session.scalars(
                    select(EmailIdentity).where(
                        EmailIdentity.account_id == account_id, EmailIdentity.identity_key.in_(keys)
                    )
                )
            )

    # --- sending authorization policies

    async def put_policy(self, account_id: str, name: str, policy_name: str, policy: str) -> None:
        policies.check_policy_name(policy_name)
        policies.parse_policy(policy)
        async with transaction(self._sessions) as session:
            row = await self._owned(session, account_id, name)
            existing = await session.get(IdentityPolicy, (row.identity_id, policy_name))
            if existing is None:
                count = len(
                    (
                        await session.scalars(
                            select(IdentityPolicy.policy_name).where(
                                IdentityPolicy.identity_id == row.identity_id
                            )
                        )
                    ).all()
                )
                if count >= policies.MAX_POLICIES:
                    raise ResourceExhausted(
                        f"An identity may have at most {policies.MAX_POLICIES} policies.",
                        reason="LIMIT_EXCEEDED",
                    )
                session.add(
                    IdentityPolicy(
                        identity_id=row.identity_id,
                        policy_name=policy_name,
                        policy=policy,
                        updated_at=self._clock.now(),
                    )
                )
            else:
                existing.policy = policy
                existing.updated_at = self._clock.now()
            identity, verified = row.identity, row.verification_status == SUCCESS
        await self._announce(account_id, identity, Change.IDENTITY_CHANGE_TYPE_POLICY_CHANGED, verified)

    async def get_policies(self, account_id: str, name: str) -> dict[str, str]:
        async with self._sessions() as session:
            row = await self._owned(session, account_id, name)
            rows = (
                await session.scalars(
                    select(IdentityPolicy).where(IdentityPolicy.identity_id == row.identity_id)
                )
            ).all()
        return {p.policy_name: p.policy for p in rows}

    async def delete_policy(self, account_id: str, name: str, policy_name: str) -> None:
        policies.check_policy_name(policy_name)
        async with transaction(self._sessions) as session:
            row = await self._owned(session, account_id, name)
            existing = await session.get(IdentityPolicy, (row.identity_id, policy_name))
            if existing is None:
                raise NotFound(f"Policy {policy_name} does not exist on {row.identity}.")
            await session.delete(existing)
            identity, verified = row.identity, row.verification_status == SUCCESS
        await self._announce(account_id, identity, Change.IDENTITY_CHANGE_TYPE_POLICY_CHANGED, verified)

    # --- internal checks (the sender and delivery workers ask these)

    async def _covering(
        self, session: AsyncSession, account_ids: Sequence[str], address: str, identity_key: str | None
    ) -> list[EmailIdentity]:
        """Verified identities of these accounts covering the address, most specific first."""
        keys = [address_key(address), *parent_domains(domain_of(address))]
        if identity_key is not None:
            keys = [k for k in keys if k == identity_key]
        if not keys:
            return []
        rows = (
            await session.scalars(
                select(EmailIdentity).where(
                    EmailIdentity.account_id.in_(account_ids),
                    EmailIdentity.identity_key.in_(keys),
                )
            )
        ).all()
        domains = {
            (r.account_id, r.identity_key)
            for r in rows
            if r.identity_type == DOMAIN and r.verification_status == SUCCESS
        }
        verified = []
        for row in rows:
            ok = row.verification_status == SUCCESS
            if row.identity_type == ADDRESS and not ok:
                # An address is verified by its domain (or a parent) being verified by the same account.
                ok = any((row.account_id, d) in domains for d in parent_domains(domain_of(row.identity_key)))
            if ok:
                verified.append(row)
        return sorted(verified, key=lambda r: keys.index(r.identity_key))

    async def _mail_from(self, session: AsyncSession, owner: str, address: str) -> str:
        """The verified custom MAIL FROM domain for mail from `address` (owner's domain identity)."""
        rows = (
            await session.scalars(
                select(EmailIdentity).where(
                    EmailIdentity.account_id == owner,
                    EmailIdentity.identity_type == DOMAIN,
                    EmailIdentity.verification_status == SUCCESS,
                    EmailIdentity.identity_key.in_(parent_domains(domain_of(address))),
                    EmailIdentity.mail_from_domain != "",
                )
            )
        ).all()
        if not rows:
            return ""
        row = max(rows, key=lambda r: len(r.identity_key))
        if row.mail_from_status == SUCCESS:
            return row.mail_from_domain
        if row.mail_from_behavior == REJECT_MESSAGE:
            raise FailedPrecondition(
                f"The custom MAIL FROM domain {row.mail_from_domain} of {row.identity} is not verified.",
                reason="MAIL_FROM_DOMAIN_NOT_VERIFIED",
            )
        return ""

    async def authorize_sender(
        self, account_id: str, from_address: str, from_identity: str
    ) -> SenderAuthorization:
        address = normalize_address(from_address, field="from_address")
        rejected = FailedPrecondition(
            f"Email address is not verified. The following identities failed the check: {address}",
            reason="MESSAGE_REJECTED",
        )
        async with self._sessions() as session:
            if not from_identity.strip():
                covering = await self._covering(session, [account_id], address, None)
                if not covering:
                    raise rejected
                chosen = covering[0]
                return SenderAuthorization(
                    chosen.identity,
                    account_id,
                    await self._mail_from(session, account_id, address),
                    self.feedback_forwarding(chosen),
                    chosen.configuration_set_name,
                )
            owner_hint, name = "", from_identity.strip()
            arn = _ARN.match(name)
            if arn:
                owner_hint, name = arn.group(1), arn.group(2)
            _, key, _ = parse_identity(name, field="from_identity")
            owners = (
                await session.scalars(
                    select(EmailIdentity.account_id).where(EmailIdentity.identity_key == key)
                )
            ).all()
            if owner_hint:
                owners = [o for o in owners if o == owner_hint]
            for owner in sorted(owners, key=lambda o: o != account_id):
                covering = await self._covering(session, [owner], address, key)
                if not covering:
                    continue
                chosen = covering[0]
                if owner != account_id:
                    texts = (
                        await session.scalars(
                            select(IdentityPolicy.policy).where(
                                IdentityPolicy.identity_id == chosen.identity_id
                            )
                        )
                    ).all()
                    if not policies.authorizes(list(texts), account_id):
                        continue
                return SenderAuthorization(
                    chosen.identity,
                    owner,
                    await self._mail_from(session, owner, address),
                    self.feedback_forwarding(chosen),
                    chosen.configuration_set_name if owner == account_id else "",
                )
        raise rejected

    async def unverified_recipients(self, account_id: str, addresses: Sequence[str]) -> list[str]:
        """The given addresses that no verified identity of the account covers (one query for all)."""
        normalized: dict[str, str] = {}
        for given in addresses:
            try:
                normalized[given] = normalize_address(given)
            except InvalidArgument:
                pass  # not an address at all: certainly not verified
        keys = {k for a in normalized.values() for k in (address_key(a), *parent_domains(domain_of(a)))}
        verified: set[str] = set()
        if keys:
            async with self._sessions() as session:
                rows = await session.execute(
                    select(EmailIdentity.identity_key).where(
                        EmailIdentity.account_id == account_id,
                        EmailIdentity.identity_key.in_(keys),
                        EmailIdentity.verification_status == SUCCESS,
                    )
                )
                verified = set(rows.scalars().all())
        return [
            given
            for given in addresses
            if given not in normalized
            or not (
                address_key(normalized[given]) in verified
                or any(d in verified for d in parent_domains(domain_of(normalized[given])))
            )
        ]

    async def signing_config(self, account_id: str, domain: str) -> tuple[str, list[SigningKey]]:
        domain = normalize_domain(domain, field="domain")
        async with self._sessions() as session:
            rows = (
                await session.scalars(
                    select(EmailIdentity).where(
                        EmailIdentity.account_id == account_id,
                        EmailIdentity.identity_type == DOMAIN,
                        EmailIdentity.verification_status == SUCCESS,
                        EmailIdentity.identity_key.in_(parent_domains(domain)),
                    )
                )
            ).all()
            if not rows:
                return domain, []
            row = max(rows, key=lambda r: len(r.identity_key))
            if not row.dkim_signing_enabled or row.dkim_status != SUCCESS:
                return row.identity_key, []
            keys = (
                await session.scalars(
                    select(DkimKey)
                    .where(
                        DkimKey.identity_id == row.identity_id,
                        DkimKey.state == ACTIVE,
                        DkimKey.found.is_(True),
                    )
                    .order_by(DkimKey.algorithm.desc())
                )
            ).all()
        return row.identity_key, [
            SigningKey(k.selector, k.algorithm, self._master_keys.open(k.key_id, _sealed(k))) for k in keys
        ]

    # --- the system sender identity

    async def ensure_system_identity(self) -> None:
        """The system account and its domain identity (VERIFICATION_MAIL_FROM's domain) exist."""
        domain = domain_of(normalize_address(self.config.system_address, field="VERIFICATION_MAIL_FROM"))
        try:
            async with transaction(self._sessions) as session:
                if await session.get(Account, SYSTEM_ACCOUNT_ID) is None:
                    session.add(
                        Account(
                            account_id=SYSTEM_ACCOUNT_ID,
                            name="postmesh system",
                            status="ACTIVE",
                            created_at=self._clock.now(),
                        )
                    )
        except IntegrityError:
            pass  # another replica made it first
        try:
            # Quietly: starting a service publishes nothing.
            await self.create(SYSTEM_ACCOUNT_ID, domain, DkimRequest(), announce=False)
        except AlreadyExists:
            pass

    async def system_identity(self) -> IdentityView:
        domain = domain_of(normalize_address(self.config.system_address, field="VERIFICATION_MAIL_FROM"))
        return await self.get(SYSTEM_ACCOUNT_ID, domain)


def _notification_kind(kind: str) -> str:
    if kind not in ("BOUNCE", "COMPLAINT", "DELIVERY"):
        raise InvalidArgument(
            "notification_type must be BOUNCE, COMPLAINT or DELIVERY.", field="notification_type"
        )
    return kind.lower()
