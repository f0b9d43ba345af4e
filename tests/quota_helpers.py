"""Helpers for the quota tests: an injected clock, sender replicas with their own gRPC clients, and
real email events on NATS."""

from __future__ import annotations

import asyncio
import datetime as dt
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeVar

import nats
from nats.js.api import ConsumerConfig, DeliverPolicy

from postmesh.common.bus import EventPublisher, new_event
from postmesh.common.clients import MeshClients
from postmesh.common.errors import PostmeshError, ResourceExhausted
from postmesh.common.sendquota import SendQuotaClient
from postmesh.common.streams import ACCOUNT_CHANGED_SUBJECT, EVENTS, OUTBOUND, event_subject, outbound_subject
from postmesh.events.v1 import events_pb2 as ev
from postmesh.sender.v1 import queue_pb2
from services.quota.notify import SYSTEM_ACCOUNT_ID

T = TypeVar("T")


class ManualClock:
    """A clock that moves only when told to (thread-safe: the mesh reads it on its own thread)."""

    def __init__(self, start: dt.datetime) -> None:
        self._now = start
        self._lock = threading.Lock()

    def now(self) -> dt.datetime:
        with self._lock:
            return self._now

    def advance(self, **delta: float) -> dt.datetime:
        with self._lock:
            self._now += dt.timedelta(**delta)
            return self._now


@dataclass
class ReplicaResult:
    accepted: int = 0
    refused: int = 0
    reasons: dict[str, int] = field(default_factory=dict)
    last_accept: float = 0.0


class SenderReplica:
    """What a sender replica uses to reserve quota: its own event loop, its own MeshClients (its own
    gRPC channel to the quota service) and its own SendQuotaClient."""

    def __init__(self, quota_address: str, service_key: str) -> None:
        self._address = quota_address
        self._service_key = service_key

    def offer(
        self, account_id: str, *, per_second: float, seconds: float, start_at: float, result: ReplicaResult
    ) -> threading.Thread:
        """Offers one-recipient messages at `per_second` from `start_at` (time.monotonic) for `seconds`."""

        async def one(quota: SendQuotaClient) -> None:
            try:
                await quota.reserve(account_id, 1)
            except ResourceExhausted as exc:
                result.refused += 1
                result.reasons[exc.reason] = result.reasons.get(exc.reason, 0) + 1
                return
            result.accepted += 1
            result.last_accept = time.monotonic()

        async def main() -> None:
            clients = MeshClients({"quota": self._address}, self._service_key)
            quota = SendQuotaClient(clients)
            tasks = []
            count = int(per_second * seconds)
            for i in range(count):
                delay = start_at + i / per_second - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
                if time.monotonic() >= start_at + seconds:
                    break
                tasks.append(asyncio.create_task(one(quota)))
            await asyncio.gather(*tasks)
            await quota.close()
            await clients.close()

        thread = threading.Thread(target=asyncio.run, args=(main(),), daemon=True)
        thread.start()
        return thread

    def burst(self, account_id: str, count: int) -> ReplicaResult:
        """`count` concurrent one-recipient reservations; every lease given back before returning."""
        result = ReplicaResult()

        async def main() -> None:
            clients = MeshClients({"quota": self._address}, self._service_key)
            quota = SendQuotaClient(clients)

            async def one() -> None:
                try:
                    await quota.reserve(account_id, 1)
                    result.accepted += 1
                except PostmeshError as exc:
                    result.refused += 1
                    result.reasons[exc.reason] = result.reasons.get(exc.reason, 0) + 1

            await asyncio.gather(*(one() for _ in range(count)))
            await quota.close()
            await clients.close()

        asyncio.run(main())
        return result


def wait_for(probe: Callable[[], T], condition: Callable[[T], bool], timeout: float = 45.0) -> T:
    """Polls `probe` until `condition` holds (events are counted asynchronously)."""
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if condition(value) or time.monotonic() > deadline:
            return value
        time.sleep(0.1)


def email_event(
    account_id: str, kind: int, at: dt.datetime, recipients: int = 1, **payload: object
) -> ev.Event:
    destination = [f"r{i}@example.test" for i in range(recipients)]
    email = ev.EmailEvent(event_type=kind, mail=ev.Mail(destination=destination), **payload)  # type: ignore[arg-type]
    if kind == ev.EMAIL_EVENT_TYPE_BOUNCE and not email.bounce.bounce_type:
        email.bounce.bounce_type = ev.BOUNCE_TYPE_PERMANENT
    if kind == ev.EMAIL_EVENT_TYPE_BOUNCE:
        email.bounce.bounced_recipients.extend(ev.BouncedRecipient(email_address=d) for d in destination)
    if kind == ev.EMAIL_EVENT_TYPE_COMPLAINT:
        email.complaint.complained_recipients.extend(
            ev.ComplainedRecipient(email_address=d) for d in destination
        )
    return new_event(account_id, time=at, email=email)


def publish(nats_url: str, events: list[ev.Event], *, again: bool = False) -> None:
    """Publishes real Event protobufs with EventPublisher; `again` republishes them as a redelivery
    would arrive (same event ids, past the stream's de-duplication)."""

    async def main() -> None:
        connection = await nats.connect(nats_url)
        js = connection.jetstream()
        publisher = EventPublisher(js)
        for event in events:
            if again:
                await js.publish(
                    event_subject(event),
                    event.SerializeToString(),
                    headers={"Nats-Msg-Id": event.event_id + "-again"},
                )
            else:
                await publisher.publish(event)
        await connection.close()

    asyncio.run(main())


def account_changed_events(nats_url: str, account_id: str) -> list[ev.AccountChanged]:
    async def main() -> list[ev.AccountChanged]:
        connection = await nats.connect(nats_url)
        js = connection.jetstream()
        subscription = await js.pull_subscribe(
            ACCOUNT_CHANGED_SUBJECT,
            stream=EVENTS.name,
            config=ConsumerConfig(deliver_policy=DeliverPolicy.ALL, inactive_threshold=5),
        )
        found = []
        while True:
            try:
                messages = await subscription.fetch(256, timeout=0.5)
            except (TimeoutError, nats.errors.TimeoutError):
                break
            for message in messages:
                event = ev.Event.FromString(message.data)
                if event.account_id == account_id:
                    found.append(event.account_changed)
                await message.ack()
        await connection.close()
        return found

    return asyncio.run(main())


def last_notification(nats_url: str) -> queue_pb2.QueuedMessage:
    async def main() -> queue_pb2.QueuedMessage:
        connection = await nats.connect(nats_url)
        message = await connection.jetstream().get_last_msg(
            OUTBOUND.name, outbound_subject(SYSTEM_ACCOUNT_ID)
        )
        await connection.close()
        return queue_pb2.QueuedMessage.FromString(message.data or b"")

    return asyncio.run(main())
