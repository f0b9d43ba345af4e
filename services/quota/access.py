"""Production access: the account describes its sending (PutAccountDetails), which files a review case;
an operator grants or denies it, or a configured rule approves it at once (domain code: no gRPC)."""

from __future__ import annotations

import datetime as dt
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from urllib.parse import urlsplit

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from postmesh.common.addresses import normalize_address
from postmesh.common.config import Settings
from postmesh.common.errors import FailedPrecondition, InvalidArgument, NotFound
from postmesh.common.paging import decode_token, encode_token
from postmesh.common.paging import page_size as size_of
from postmesh.common.service import Clock
from services.quota.accounts import HEALTHY, OPERATOR, SYSTEM, QuotaAccounts, bucket_capacity
from services.quota.models import AccountQuota, ProductionAccessCase
from services.quota.notify import Notifier

PENDING, GRANTED, DENIED = "PENDING", "GRANTED", "DENIED"
MAX_CONTACTS = 4
MAIL_TYPES = ("MARKETING", "TRANSACTIONAL")
LANGUAGES = ("EN", "JA")


@dataclass(frozen=True)
class AccountDetailsInput:
    mail_type: str  # MARKETING, TRANSACTIONAL
    website_url: str
    contact_language: str  # EN, JA; empty: EN
    use_case_description: str
    contact_addresses: Sequence[str]
    production_access_requested: bool
    expected_daily_volume: int


class CaseIds:
    """Case ids that sort by filing time (newest last): microseconds first, never repeating a time
    within this process even when the clock stands still, then a random part across replicas."""

    def __init__(self, clock: Clock) -> None:
        self._clock = clock
        self._last = dt.datetime.min.replace(tzinfo=dt.UTC)

    def new(self) -> str:
        at = max(self._clock.now(), self._last + dt.timedelta(microseconds=1))
        self._last = at
        return at.strftime("%Y%m%d%H%M%S%f") + secrets.token_hex(2)


def validate_details(details: AccountDetailsInput) -> tuple[str, list[str]]:
    """The language to store and the normalized contact addresses; INVALID_ARGUMENT naming the field."""
    if details.mail_type not in MAIL_TYPES:
        raise InvalidArgument("mail_type must be MARKETING or TRANSACTIONAL.", field="mail_type")
    url = details.website_url.strip()
    parts = urlsplit(url)
    if len(url) > 1000 or parts.scheme not in ("http", "https") or not parts.netloc:
        raise InvalidArgument("website_url must be an http or https URL.", field="website_url")
    language = details.contact_language or "EN"
    if language not in LANGUAGES:
        raise InvalidArgument("contact_language must be EN or JA.", field="contact_language")
    description = details.use_case_description.strip()
    if len(description) > 5000:
        raise InvalidArgument(
            "use_case_description must be at most 5000 characters.", field="use_case_description"
        )
    if details.production_access_requested and not description:
        raise InvalidArgument(
            "use_case_description is required to request production access.", field="use_case_description"
        )
    if len(details.contact_addresses) > MAX_CONTACTS:
        raise InvalidArgument(
            f"At most {MAX_CONTACTS} additional contact addresses.",
            field="additional_contact_email_addresses",
        )
    contacts = [
        normalize_address(a, field="additional_contact_email_addresses") for a in details.contact_addresses
    ]
    if details.expected_daily_volume < 0:
        raise InvalidArgument("expected_daily_volume must not be negative.", field="expected_daily_volume")
    return language, list(dict.fromkeys(contacts))


class ProductionAccess:
    def __init__(
        self,
        sessions: async_sessionmaker[AsyncSession],
        clock: Clock,
        settings: Settings,
        accounts: QuotaAccounts,
        notifier: Notifier,
    ) -> None:
        self._sessions = sessions
        self._clock = clock
        self._settings = settings
        self._accounts = accounts
        self._notifier = notifier
        self._case_ids = CaseIds(clock)

    async def put_details(self, account_id: str, details: AccountDetailsInput) -> tuple[str, str]:
        """Stores the details; files (or updates) a review case when production access is requested.
        Returns (review status, case id), empty when no case was ever filed."""
        language, contacts = validate_details(details)
        granted_row: AccountQuota | None = None
        async with self._accounts.locked(account_id) as (session, row):
            row.mail_type = details.mail_type
            row.website_url = details.website_url.strip()
            row.contact_language = language
            row.use_case_description = details.use_case_description.strip()
            row.contact_addresses = "\n".join(contacts)
            row.expected_daily_volume = details.expected_daily_volume
            case = await session.get(ProductionAccessCase, row.review_case_id) if row.review_case_id else None
            if details.production_access_requested and not row.production_access:
                if case is None or case.status != PENDING:
                    case = ProductionAccessCase(
                        case_id=self._case_ids.new(),
                        account_id=account_id,
                        status=PENDING,
                        created_at=self._clock.now(),
                        decision_note="",
                    )
                    session.add(case)
                    row.review_case_id = case.case_id
                case.mail_type = row.mail_type
                case.website_url = row.website_url
                case.contact_language = row.contact_language
                case.use_case_description = row.use_case_description
                case.contact_addresses = row.contact_addresses
                case.expected_daily_volume = row.expected_daily_volume
                rule = self._auto_approval(row)
                if rule:
                    self._grant(session, row, case, 0.0, 0.0, rule, SYSTEM)
                    granted_row = row
            status, case_id = (case.status, case.case_id) if case is not None else ("", "")
        if granted_row is not None:
            await self._notifier.account_changed(
                granted_row, "Production access granted automatically.", title="production access granted"
            )
        return status, case_id

    def _auto_approval(self, row: AccountQuota) -> str:
        """The rule that approves this request at once, or "" when an operator must review it."""
        limit = self._settings.production_access_auto_approve_max_volume
        if limit <= 0 or row.enforcement_status != HEALTHY or not row.sending_enabled:
            return ""
        if not (row.website_url and row.use_case_description) or row.expected_daily_volume > limit:
            return ""
        return f"Approved automatically: healthy account expecting at most {limit} messages a day."

    def _grant(
        self,
        session: AsyncSession,
        row: AccountQuota,
        case: ProductionAccessCase,
        max_24_hour_send: float,
        max_send_rate: float,
        note: str,
        actor: str,
    ) -> None:
        now = self._clock.now()
        row.production_access = True
        row.max_24_hour_send = max_24_hour_send or self._settings.production_max_24_hour_send
        row.max_send_rate = max_send_rate or self._settings.production_max_send_rate
        row.tokens = min(row.tokens, bucket_capacity(row.max_send_rate))
        row.quota_changed_at = now
        case.status, case.decided_at, case.decision_note = GRANTED, now, note
        self._accounts.record(
            session, row, "PRODUCTION_ACCESS", f"Production access granted. {note}".strip(), actor
        )

    async def _decide(
        self, case_id: str, grant: bool, note: str, max_24_hour_send: float = 0.0, max_send_rate: float = 0.0
    ) -> ProductionAccessCase:
        if not case_id:
            raise InvalidArgument("case_id is required.", field="case_id")
        if max_24_hour_send < 0:
            raise InvalidArgument("max_24_hour_send must not be negative.", field="max_24_hour_send")
        if max_send_rate < 0:
            raise InvalidArgument("max_send_rate must not be negative.", field="max_send_rate")
        async with self._sessions() as session:
            found = await session.get(ProductionAccessCase, case_id)
        if found is None:
            raise NotFound(f"Production access request {case_id} does not exist.")
        async with self._accounts.locked(found.account_id) as (session, row):
            case = await session.get(ProductionAccessCase, case_id, populate_existing=True)
            assert case is not None
            if case.status != PENDING:
                raise FailedPrecondition(
                    f"Production access request {case_id} was already {case.status.lower()}.",
                    reason="REQUEST_ALREADY_DECIDED",
                )
            if grant:
                self._grant(session, row, case, max_24_hour_send, max_send_rate, note, OPERATOR)
                reason = f"Production access granted. {note}".strip()
            else:
                case.status, case.decided_at, case.decision_note = DENIED, self._clock.now(), note
                reason = f"Production access denied. {note}".strip()
                self._accounts.record(session, row, "PRODUCTION_ACCESS", reason, OPERATOR)
        title = "production access granted" if grant else "production access request denied"
        await self._notifier.account_changed(row, reason, title=title)
        return case

    async def grant(
        self, case_id: str, max_24_hour_send: float, max_send_rate: float, note: str
    ) -> ProductionAccessCase:
        return await self._decide(case_id, True, note, max_24_hour_send, max_send_rate)

    async def deny(self, case_id: str, note: str) -> ProductionAccessCase:
        return await self._decide(case_id, False, note)

    async def list_requests(
        self, status: str, page_size: int, page_token: str
    ) -> tuple[Sequence[ProductionAccessCase], str]:
        """Newest first, optionally only one status."""
        size = size_of(page_size)
        statement = select(ProductionAccessCase)
        if status:
            statement = statement.where(ProductionAccessCase.status == status)
        if page_token:
            statement = statement.where(ProductionAccessCase.case_id < str(decode_token(page_token)))
        statement = statement.order_by(ProductionAccessCase.case_id.desc()).limit(size + 1)
        async with self._sessions() as session:
            rows = (await session.scalars(statement)).all()
        if len(rows) > size:
            return rows[:size], encode_token(rows[size - 1].case_id)
        return rows, ""

    async def review_status(self, case_id: str) -> str:
        if not case_id:
            return ""
        async with self._sessions() as session:
            case = await session.get(ProductionAccessCase, case_id)
        return case.status if case is not None else ""
