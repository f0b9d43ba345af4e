"""Configuration sets (SES v2) and their event destinations: rules and storage, no gRPC here.

A change to a set or its destinations calls `changed(account_id, name)`, which the service turns into
a ConfigurationSetChanged event, so the sender's kept copies and the dispatcher's are dropped.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

from sqlalchemy import delete, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from postmesh.common.db import transaction
from postmesh.common.errors import AlreadyExists, InvalidArgument, NotFound, ResourceExhausted
from postmesh.common.paging import keyset_page, split_page
from postmesh.common.service import Clock
from services.feedback.models import ConfigurationSet, EventDestination, WebhookDelivery
from services.feedback.suppression import REASONS

_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
TLS_POLICIES = ("OPTIONAL", "REQUIRE")
# SES's event types, in the names its API uses.
EVENT_TYPES = (
    "SEND",
    "REJECT",
    "BOUNCE",
    "COMPLAINT",
    "DELIVERY",
    "DELIVERY_DELAY",
    "RENDERING_FAILURE",
    "OPEN",
    "CLICK",
    "SUBSCRIPTION",
)
WEBHOOK = "webhook"
NATS = "nats"
CONFIRMED = "CONFIRMED"
PENDING_CONFIRMATION = "PENDING_CONFIRMATION"

Changed = Callable[[str, str], Awaitable[None]]


def check_name(name: str, field: str) -> str:
    if not _NAME.match(name):
        raise InvalidArgument(f"{field} must be 1 to 64 letters, digits, '_' or '-'.", field=field)
    return name


def check_reasons(reasons: Sequence[str]) -> str:
    for reason in reasons:
        if reason not in REASONS:
            raise InvalidArgument(
                f"Unknown suppressed reason {reason!r}: BOUNCE or COMPLAINT.", field="suppressed_reasons"
            )
    return ",".join(sorted(set(reasons)))


# The request field a refusal names, as the other fields of an event destination are named.
_TYPES_FIELD = "event_destination.matching_event_types"


def check_event_types(types: Sequence[str]) -> str:
    if not types:
        raise InvalidArgument("matching_event_types needs at least one event type.", field=_TYPES_FIELD)
    for name in types:
        if name not in EVENT_TYPES:
            raise InvalidArgument(f"Unknown event type {name!r}.", field=_TYPES_FIELD)
    return ",".join(t for t in EVENT_TYPES if t in set(types))


MIN_DELIVERY_SECONDS, MAX_DELIVERY_SECONDS = 300, 50400


def check_max_delivery_seconds(value: int) -> int:
    if value and not MIN_DELIVERY_SECONDS <= value <= MAX_DELIVERY_SECONDS:
        raise InvalidArgument(
            f"max_delivery_seconds must be {MIN_DELIVERY_SECONDS} to {MAX_DELIVERY_SECONDS} "
            "(0: the default).",
            field="max_delivery_seconds",
        )
    return value


# The sender's spam policy modes a set may choose ("": none of its own).
SPAM_POLICIES = ("off", "tag", "hold", "reject")


def check_spam_policy(mode: str, threshold: float) -> tuple[str, float]:
    if mode not in ("", *SPAM_POLICIES):
        raise InvalidArgument(
            f"Unknown spam policy {mode!r}: choose one of {', '.join(SPAM_POLICIES)}.",
            field="spam_policy.mode",
        )
    if not (0 <= threshold < float("inf")):  # also refuses NaN
        raise InvalidArgument(
            "threshold must be a finite, non-negative score.", field="spam_policy.threshold"
        )
    return mode, threshold if mode else 0.0


def not_found(name: str) -> NotFound:
    return NotFound(f"Configuration set {name} does not exist.", reason="NOT_FOUND")


@dataclass(frozen=True)
class Options:
    """A set's options as create takes them; None: SES's default."""

    sending_enabled: bool = True
    tls_policy: str = "OPTIONAL"
    max_delivery_seconds: int = 0
    reputation_metrics_enabled: bool = False
    suppressed_reasons: Sequence[str] | None = None
    custom_redirect_domain: str = ""
    # The set's own spam policy ("": none) and its threshold (0: the operator's SPAM_THRESHOLD).
    spam_policy: str = ""
    spam_threshold: float = 0.0


@dataclass(frozen=True)
class Target:
    """What a destination points at, already validated: a webhook URL or a NATS subject."""

    kind: str
    target: str
    format: str
    subscription_status: str = CONFIRMED
    # SNS format: the SignatureVersion of its messages.
    signature_version: int = 1


@dataclass(frozen=True)
class DestinationSpec:
    enabled: bool
    event_types: Sequence[str]
    target: Target


class ConfigurationSets:
    def __init__(
        self,
        sessions: async_sessionmaker[AsyncSession],
        clock: Clock,
        *,
        changed: Changed,
        max_destinations: int = 10,
    ) -> None:
        self._sessions = sessions
        self._clock = clock
        self._changed = changed
        self._max_destinations = max_destinations

    # --- sets

    async def create(self, account_id: str, name: str, options: Options) -> ConfigurationSet:
        check_name(name, "configuration_set_name")
        if options.tls_policy not in TLS_POLICIES:
            raise InvalidArgument("tls_policy must be REQUIRE or OPTIONAL.", field="tls_policy")
        spam_policy, spam_threshold = check_spam_policy(options.spam_policy, options.spam_threshold)
        row = ConfigurationSet(
            account_id=account_id,
            name=name,
            sending_enabled=options.sending_enabled,
            tls_policy=options.tls_policy,
            max_delivery_seconds=check_max_delivery_seconds(options.max_delivery_seconds),
            reputation_metrics_enabled=options.reputation_metrics_enabled,
            suppressed_reasons=(
                None if options.suppressed_reasons is None else check_reasons(options.suppressed_reasons)
            ),
            custom_redirect_domain=options.custom_redirect_domain,
            spam_policy=spam_policy,
            spam_threshold=spam_threshold,
            created_at=self._clock.now(),
        )
        try:
            async with transaction(self._sessions) as session:
                if await self._find(session, account_id, name) is not None:
                    raise _exists(name)
                session.add(row)
        except IntegrityError:  # created concurrently
            raise _exists(name) from None
        await self._changed(account_id, name)
        return row

    async def get(self, account_id: str, name: str) -> ConfigurationSet:
        async with self._sessions() as session:
            row = await self._find(session, account_id, name)
        if row is None:
            raise not_found(name)
        return row

    async def names(self, account_id: str, size: int, token: str) -> tuple[list[str], str]:
        statement, size = keyset_page(
            select(ConfigurationSet).where(ConfigurationSet.account_id == account_id),
            ConfigurationSet.name,
            size,
            token,
        )
        async with self._sessions() as session:
            rows = list(await session.scalars(statement))
        page, next_token = split_page(rows, size, lambda r: r.name)
        return [r.name for r in page], next_token

    async def delete(self, account_id: str, name: str) -> None:
        async with transaction(self._sessions) as session:
            row = await self._find(session, account_id, name)
            if row is None:
                raise not_found(name)
            ids = select(EventDestination.id).where(EventDestination.configuration_set_id == row.id)
            await session.execute(delete(WebhookDelivery).where(WebhookDelivery.destination_id.in_(ids)))
            await session.execute(
                delete(EventDestination).where(EventDestination.configuration_set_id == row.id)
            )
            await session.delete(row)
        await self._changed(account_id, name)

    async def update(self, account_id: str, name: str, **values: object) -> None:
        """Sets the given columns of one set (the Put*Options operations)."""
        if "tls_policy" in values and values["tls_policy"] not in TLS_POLICIES:
            raise InvalidArgument("tls_policy must be REQUIRE or OPTIONAL.", field="tls_policy")
        if "max_delivery_seconds" in values:
            check_max_delivery_seconds(int(values["max_delivery_seconds"]))  # type: ignore[call-overload]
        if "spam_policy" in values:
            values["spam_policy"], values["spam_threshold"] = check_spam_policy(
                str(values["spam_policy"]),
                float(values.get("spam_threshold", 0.0)),  # type: ignore[arg-type]
            )
        async with transaction(self._sessions) as session:
            row = await self._find(session, account_id, name)
            if row is None:
                raise not_found(name)
            for column, value in values.items():
                setattr(row, column, value)
        await self._changed(account_id, name)

    async def _find(self, session: AsyncSession, account_id: str, name: str) -> ConfigurationSet | None:
        return await session.scalar(
            select(ConfigurationSet).where(
                ConfigurationSet.account_id == account_id, ConfigurationSet.name == name
            )
        )

    # --- event destinations

    async def add_destination(
        self, account_id: str, set_name: str, name: str, spec: DestinationSpec, sealed_secret: bytes
    ) -> EventDestination:
        check_name(name, "event_destination_name")
        types = check_event_types(spec.event_types)
        try:
            async with transaction(self._sessions) as session:
                owner = await self._find(session, account_id, set_name)
                if owner is None:
                    raise not_found(set_name)
                existing = list(
                    await session.scalars(
                        select(EventDestination.name).where(EventDestination.configuration_set_id == owner.id)
                    )
                )
                if name in existing:
                    raise AlreadyExists(
                        f"Event destination {name} already exists in configuration set {set_name}."
                    )
                if len(existing) >= self._max_destinations:
                    raise ResourceExhausted(
                        f"A configuration set can have at most {self._max_destinations} event destinations.",
                        reason="LIMIT_EXCEEDED",
                    )
                row = EventDestination(
                    configuration_set_id=owner.id,
                    account_id=account_id,
                    name=name,
                    enabled=spec.enabled,
                    event_types=types,
                    kind=spec.target.kind,
                    target=spec.target.target,
                    format=spec.target.format,
                    subscription_status=spec.target.subscription_status,
                    signature_version=spec.target.signature_version,
                    sealed_secret=sealed_secret,
                    created_at=self._clock.now(),
                )
                session.add(row)
        except IntegrityError:
            raise AlreadyExists(
                f"Event destination {name} already exists in configuration set {set_name}."
            ) from None
        await self._changed(account_id, set_name)
        return row

    async def destinations(self, account_id: str, set_name: str) -> list[EventDestination]:
        async with self._sessions() as session:
            owner = await self._find(session, account_id, set_name)
            if owner is None:
                raise not_found(set_name)
            return list(
                await session.scalars(
                    select(EventDestination)
                    .where(EventDestination.configuration_set_id == owner.id)
                    .order_by(EventDestination.name)
                )
            )

    async def update_destination(
        self, account_id: str, set_name: str, name: str, spec: DestinationSpec
    ) -> None:
        """Replaces the destination's definition; a webhook keeps its signing secret."""
        types = check_event_types(spec.event_types)
        async with transaction(self._sessions) as session:
            row = await self._find_destination(session, account_id, set_name, name)
            if row.kind != spec.target.kind:
                raise InvalidArgument(
                    "An event destination keeps its kind (webhook or NATS subject): delete it and create "
                    "another.",
                    field="event_destination",
                )
            same_target = row.kind == spec.target.kind and row.target == spec.target.target
            row.enabled = spec.enabled
            row.event_types = types
            if not (same_target and row.format == spec.target.format):
                row.subscription_status = spec.target.subscription_status
            row.kind = spec.target.kind
            row.target = spec.target.target
            row.format = spec.target.format
            row.signature_version = spec.target.signature_version
        await self._changed(account_id, set_name)

    async def remove_destination(self, account_id: str, set_name: str, name: str) -> None:
        async with transaction(self._sessions) as session:
            row = await self._find_destination(session, account_id, set_name, name)
            await session.execute(delete(WebhookDelivery).where(WebhookDelivery.destination_id == row.id))
            await session.delete(row)
        await self._changed(account_id, set_name)

    async def _find_destination(
        self, session: AsyncSession, account_id: str, set_name: str, name: str
    ) -> EventDestination:
        owner = await self._find(session, account_id, set_name)
        if owner is None:
            raise not_found(set_name)
        row = await session.scalar(
            select(EventDestination).where(
                EventDestination.configuration_set_id == owner.id, EventDestination.name == name
            )
        )
        if row is None:
            raise NotFound(f"Event destination {name} does not exist in configuration set {set_name}.")
        return row

    async def webhook(self, account_id: str, set_name: str, name: str) -> EventDestination | None:
        """An enabled webhook destination by set and name (identity notifications name them so)."""
        async with self._sessions() as session:
            return await session.scalar(
                select(EventDestination)
                .join(ConfigurationSet, ConfigurationSet.id == EventDestination.configuration_set_id)
                .where(
                    ConfigurationSet.account_id == account_id,
                    ConfigurationSet.name == set_name,
                    EventDestination.name == name,
                    EventDestination.kind == WEBHOOK,
                    EventDestination.enabled.is_(True),
                )
            )

    async def routes(self, account_id: str, set_name: str) -> list[EventDestination]:
        """The enabled destinations of a set (none when the set does not exist): the dispatcher's view."""
        async with self._sessions() as session:
            return list(
                await session.scalars(
                    select(EventDestination)
                    .join(ConfigurationSet, ConfigurationSet.id == EventDestination.configuration_set_id)
                    .where(
                        ConfigurationSet.account_id == account_id,
                        ConfigurationSet.name == set_name,
                        EventDestination.enabled.is_(True),
                    )
                )
            )


def _exists(name: str) -> AlreadyExists:
    return AlreadyExists(f"Configuration set {name} already exists.", reason="ALREADY_EXISTS")
