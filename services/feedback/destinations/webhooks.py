"""Webhook deliveries: an outbox in the feedback database, drained per destination.

Each event for a webhook becomes one row (unique per destination and event, so a redelivered event is
queued once). A dispatcher loop finds destinations with rows due and drains each in a task of its own,
oldest first, one request at a time: a slow or dead endpoint holds only its own queue. A failed attempt
schedules the row again after an exponential backoff (`retry_delay`); a row still failing when the
retry period has passed becomes a dead letter, kept until an operator replays it. When an endpoint
answers again, its waiting rows are made due at once, so a recovered endpoint catches up quickly.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import ipaddress
import json
import logging
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from urllib.parse import urlsplit, urlunsplit

import httpx
from sqlalchemy import delete, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from postmesh.common.db import transaction
from postmesh.common.errors import FailedPrecondition, InvalidArgument, PostmeshError
from postmesh.common.paging import keyset_page, split_page
from postmesh.common.service import Clock
from postmesh.events.v1 import events_pb2 as ev
from services.feedback.configsets import CONFIRMED
from services.feedback.destinations import sesjson
from services.feedback.destinations.signing import SIGNATURE_HEADER, SecretBox, signature_header
from services.feedback.destinations.targets import check_address
from services.feedback.models import ConfigurationSet, EventDestination, WebhookDelivery

log = logging.getLogger(__name__)

USER_AGENT = "postmesh-webhooks/1"
_BATCH = 50


def retry_delay(attempt: int, *, base: float, cap: float) -> float:
    """Seconds before attempt `attempt + 1`, after `attempt` failed ones: base * 2^(attempt-1), capped."""
    return float(min(cap, base * (2 ** max(0, attempt - 1))))


@dataclass(frozen=True)
class Request:
    body: bytes
    headers: dict[str, str]


# What a webhook format other than JSON makes of a queued row (an event, or that format's own
# messages, such as SNS's SubscriptionConfirmation): see sns_subscriptions.py.
Formatter = Callable[[EventDestination, WebhookDelivery], Request]


EVENT = "event"
NOTIFICATION = "notification"
NOTIFICATION_WITH_HEADERS = "notification+headers"
_EVENT_SHAPES = (EVENT, NOTIFICATION, NOTIFICATION_WITH_HEADERS)


def json_request(
    destination: EventDestination, secret: str, event: ev.Event, *, now: int, shape: str = EVENT
) -> Request:
    if shape == EVENT:
        body = sesjson.event_json(event).encode()
    else:
        record = sesjson.notification_record(event, include_headers=shape == NOTIFICATION_WITH_HEADERS)
        body = json.dumps(record, separators=(",", ":"), ensure_ascii=False).encode()
    return Request(
        body=body,
        headers={
            "Content-Type": "application/json",
            "User-Agent": USER_AGENT,
            "X-Postmesh-Event-Id": event.event_id,
            "X-Postmesh-Destination": destination.name,
            SIGNATURE_HEADER: signature_header(secret, now, body),
        },
    )


class WebhookOutbox:
    """The rows: queued, attempted, dead, replayed."""

    def __init__(
        self,
        sessions: async_sessionmaker[AsyncSession],
        clock: Clock,
        *,
        retry_period: dt.timedelta,
        backoff: float,
        backoff_max: float,
    ) -> None:
        self._sessions = sessions
        self._clock = clock
        self._retry_period = retry_period
        self._backoff = backoff
        self._backoff_max = backoff_max

    async def enqueue(self, destination: EventDestination, event: ev.Event, shape: str = EVENT) -> None:
        now = self._clock.now()
        # One row per destination, event and shape: a destination may get an event and a notification.
        key = event.event_id if shape == EVENT else f"{event.event_id}:n"
        try:
            async with transaction(self._sessions) as session:
                exists = await session.scalar(
                    select(WebhookDelivery.id).where(
                        WebhookDelivery.destination_id == destination.id,
                        WebhookDelivery.event_id == key,
                    )
                )
                if exists is None:
                    session.add(
                        WebhookDelivery(
                            destination_id=destination.id,
                            account_id=destination.account_id,
                            event_id=key,
                            shape=shape,
                            event=event.SerializeToString(),
                            dead=False,
                            attempts=0,
                            last_error="",
                            first_attempt_at=now,
                            next_attempt_at=now,
                        )
                    )
        except IntegrityError:  # queued concurrently by another replica
            pass

    async def due_destinations(self, limit: int) -> list[int]:
        async with self._sessions() as session:
            return list(
                await session.scalars(
                    select(WebhookDelivery.destination_id)
                    .where(
                        WebhookDelivery.dead.is_(False), WebhookDelivery.next_attempt_at <= self._clock.now()
                    )
                    .distinct()
                    .limit(limit)
                )
            )

    async def due(self, destination_id: int) -> tuple[EventDestination | None, list[WebhookDelivery]]:
        async with self._sessions() as session:
            destination = await session.get(EventDestination, destination_id)
            rows = list(
                await session.scalars(
                    select(WebhookDelivery)
                    .where(
                        WebhookDelivery.destination_id == destination_id,
                        WebhookDelivery.dead.is_(False),
                        WebhookDelivery.next_attempt_at <= self._clock.now(),
                    )
                    .order_by(WebhookDelivery.first_attempt_at, WebhookDelivery.id)
                    .limit(_BATCH)
                )
            )
        return destination, rows

    async def delivered(self, row: WebhookDelivery, *, after_failures: bool) -> None:
        async with transaction(self._sessions) as session:
            await session.execute(delete(WebhookDelivery).where(WebhookDelivery.id == row.id))
            if after_failures:  # the endpoint is back: what waits for it is due now
                await session.execute(
                    update(WebhookDelivery)
                    .where(
                        WebhookDelivery.destination_id == row.destination_id, WebhookDelivery.dead.is_(False)
                    )
                    .values(next_attempt_at=self._clock.now())
                )

    async def discard(self, ids: Sequence[int]) -> None:
        if ids:
            async with transaction(self._sessions) as session:
                await session.execute(delete(WebhookDelivery).where(WebhookDelivery.id.in_(list(ids))))

    async def failed(self, row: WebhookDelivery, error: str) -> None:
        now = self._clock.now()
        attempts = row.attempts + 1
        values: dict[str, object] = {"attempts": attempts, "last_error": error[:1000]}
        if now - row.first_attempt_at >= self._retry_period:
            values.update(dead=True, dead_at=now)
        else:
            delay = retry_delay(attempts, base=self._backoff, cap=self._backoff_max)
            values["next_attempt_at"] = now + dt.timedelta(seconds=delay)
        async with transaction(self._sessions) as session:
            await session.execute(
                update(WebhookDelivery).where(WebhookDelivery.id == row.id).values(**values)
            )

    # --- dead letters (operator)

    async def dead_letters(
        self, account_id: str, size: int, token: str
    ) -> tuple[Sequence[tuple[WebhookDelivery, EventDestination, ConfigurationSet]], str]:
        statement = (
            select(WebhookDelivery, EventDestination, ConfigurationSet)
            .join(EventDestination, EventDestination.id == WebhookDelivery.destination_id)
            .join(ConfigurationSet, ConfigurationSet.id == EventDestination.configuration_set_id)
            .where(WebhookDelivery.dead.is_(True))
        )
        if account_id:
            statement = statement.where(WebhookDelivery.account_id == account_id)
        page, size = keyset_page(statement, WebhookDelivery.id, size, token)  # type: ignore[arg-type]
        async with self._sessions() as session:
            rows: list[tuple[WebhookDelivery, EventDestination, ConfigurationSet]] = [
                (row[0], row[1], row[2]) for row in (await session.execute(page)).all()
            ]
        return split_page(rows, size, lambda r: r[0].id)

    async def replay(self, ids: Sequence[int], *, every: bool, account_id: str) -> int:
        if not ids and not every:
            raise InvalidArgument("Name the dead letters to replay, or ask for all of them.", field="ids")
        now = self._clock.now()
        statement = update(WebhookDelivery).where(WebhookDelivery.dead.is_(True))
        if ids:
            statement = statement.where(WebhookDelivery.id.in_(list(ids)))
        if account_id:
            statement = statement.where(WebhookDelivery.account_id == account_id)
        async with transaction(self._sessions) as session:
            result = await session.execute(
                statement.values(
                    dead=False, dead_at=None, attempts=0, first_attempt_at=now, next_attempt_at=now
                )
            )
        return int(getattr(result, "rowcount", 0) or 0)


Resolve = Callable[[str, int], Awaitable[list[str]]]


async def _resolve(host: str, port: int) -> list[str]:
    infos = await asyncio.get_running_loop().getaddrinfo(host, port)
    return [str(info[4][0]) for info in infos]


class WebhookDispatcher:
    def __init__(
        self,
        outbox: WebhookOutbox,
        box: SecretBox,
        *,
        timeout: float,
        poll_seconds: float,
        allow_private: bool,
        formatters: Mapping[str, Formatter] | None = None,
        max_active: int = 64,
        resolve: Resolve = _resolve,
    ) -> None:
        self._outbox = outbox
        self._box = box
        self._timeout = timeout
        self._poll = poll_seconds
        self._allow_private = allow_private
        self._formatters = dict(formatters or {})
        self._max_active = max_active
        self._resolve = resolve
        self._active: dict[int, asyncio.Task[None]] = {}
        self._wake = asyncio.Event()

    def add_format(self, name: str, formatter: Formatter) -> None:
        self._formatters[name] = formatter

    def formats(self) -> set[str]:
        return {"JSON", *self._formatters}

    def wake(self) -> None:
        """New rows were queued: look now rather than at the next poll."""
        self._wake.set()

    async def run(self) -> None:
        async with httpx.AsyncClient(timeout=self._timeout, follow_redirects=False) as client:
            try:
                while True:
                    self._wake.clear()
                    for destination_id in await self._outbox.due_destinations(self._max_active * 2):
                        if destination_id in self._active or len(self._active) >= self._max_active:
                            continue
                        task = asyncio.create_task(self._drain(client, destination_id))
                        self._active[destination_id] = task
                        task.add_done_callback(self._finished(destination_id))
                    try:
                        await asyncio.wait_for(self._wake.wait(), self._poll)
                    except TimeoutError:
                        pass
            finally:
                for task in list(self._active.values()):
                    task.cancel()
                if self._active:
                    await asyncio.gather(*self._active.values(), return_exceptions=True)

    def _finished(self, destination_id: int) -> Callable[[asyncio.Task[None]], None]:
        def forget(_: asyncio.Task[None]) -> None:
            self._active.pop(destination_id, None)

        return forget

    async def _drain(self, client: httpx.AsyncClient, destination_id: int) -> None:
        failing = False
        try:
            while True:
                destination, rows = await self._outbox.due(destination_id)
                if destination is None:
                    return
                if destination.subscription_status != CONFIRMED:
                    # A pending subscription gets its handshake and nothing else; events queued just
                    # before it became pending are dropped, as SNS drops them.
                    rows = await self._drop(rows, lambda r: r.shape in _EVENT_SHAPES)
                elif destination.format not in self._formatters:
                    # A format's own messages (SNS's handshake) for a destination since turned to JSON.
                    rows = await self._drop(rows, lambda r: r.shape not in _EVENT_SHAPES)
                if not rows:
                    return
                for row in rows:
                    error = await self._attempt(client, destination, row)
                    if error:
                        await self._outbox.failed(row, error)
                        return  # the endpoint is failing: its other rows wait for their own times
                    await self._outbox.delivered(row, after_failures=failing or row.attempts > 0)
                    failing = False
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("webhook drain failed", extra={"destination": destination_id})

    async def _drop(
        self, rows: list[WebhookDelivery], dropped: Callable[[WebhookDelivery], bool]
    ) -> list[WebhookDelivery]:
        await self._outbox.discard([r.id for r in rows if dropped(r)])
        return [r for r in rows if not dropped(r)]

    async def _attempt(
        self, client: httpx.AsyncClient, destination: EventDestination, row: WebhookDelivery
    ) -> str:
        """ "" when the endpoint took the event (2xx), else why not."""
        try:
            request = self.request(destination, row)
            url, host, server_name = await self._pinned(destination.target)
            response = await client.post(
                url, content=request.body, headers={**request.headers, **host}, extensions=server_name
            )
        except PostmeshError as exc:
            return exc.message
        except httpx.HTTPError as exc:
            return f"{type(exc).__name__}: {exc}"
        if 200 <= response.status_code < 300:
            return ""
        return f"HTTP {response.status_code}"

    def request(self, destination: EventDestination, row: WebhookDelivery) -> Request:
        formatter = self._formatters.get(destination.format)
        if formatter is not None:
            return formatter(destination, row)
        if destination.format != "JSON":
            raise FailedPrecondition(
                f"The {destination.format} webhook format is not available on this postmesh.",
                reason="UNSUPPORTED_FORMAT",
            )
        secret = self._box.open(destination.account_id, destination.sealed_secret)
        event = ev.Event.FromString(row.event)
        return json_request(destination, secret, event, now=int(time.time()), shape=row.shape)

    async def _pinned(self, url: str) -> tuple[str, dict[str, str], dict[str, str]]:
        """The URL with its host replaced by an address checked now (DNS may have changed since the
        destination was made), the Host header, and the TLS server name: the request goes to exactly
        the address that was checked, and the certificate is still checked against the host name."""
        parts = urlsplit(url)
        host = parts.hostname or ""
        try:
            literal = ipaddress.ip_address(host)
        except ValueError:
            literal = None
        if literal is not None:
            check_address(literal, allow_private=self._allow_private)
            return url, {}, {}
        try:
            addresses = await self._resolve(host, parts.port or (443 if parts.scheme == "https" else 80))
        except OSError as exc:
            raise InvalidArgument(f"cannot resolve {host}: {exc}") from None
        if not addresses:
            raise InvalidArgument(f"{host} has no address")
        for address in addresses:
            check_address(ipaddress.ip_address(address.split("%")[0]), allow_private=self._allow_private)
        chosen = addresses[0].split("%")[0]
        netloc = f"[{chosen}]" if ":" in chosen else chosen
        if parts.port:
            netloc += f":{parts.port}"
        pinned = urlunsplit((parts.scheme, netloc, parts.path, parts.query, ""))
        server_name = {"sni_hostname": host} if parts.scheme == "https" else {}
        return pinned, {"Host": parts.netloc.rpartition("@")[2]}, server_name
