"""SubscribeEvents: an account's email events for a client that follows them over gRPC.

Each subscription is a durable JetStream consumer on the account's own event subjects, named after the
account and the client's subscription name, so a client that reconnects under the same name resumes
after what it acknowledged (at least once). JetStream stops sending once `max_unacked` events wait for
an acknowledgement, and sends again what is not acknowledged within `ack_wait`: a client that never
acknowledges costs a bounded amount of memory, here and on the server. A subscription nobody opens for
`SubscribedAccounts.inactive_days` is removed by JetStream. Only the events of accounts marked as
subscribed are put on the account streams (see subscribers.py): a subscription marks its account before
its consumer exists, and again while it is followed.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass

from google.protobuf.message import DecodeError
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from nats.js.errors import NotFoundError

from postmesh.common.bus import fetch_batch
from postmesh.common.errors import InvalidArgument, NotFound
from postmesh.common.pull import Puller
from postmesh.common.streams import ACCOUNT_EVENTS, DAY, account_events_filter, account_events_subject
from postmesh.events.v1 import events_pb2 as ev
from services.feedback.configsets import check_name
from services.feedback.destinations.subscribers import REMARK_SECONDS, SubscribedAccounts


@dataclass(frozen=True)
class Opening:
    name: str
    event_types: Sequence[int]


def consumer_name(account_id: str, name: str) -> str:
    return f"sub_{account_id}_{name}"


class Subscriptions:
    def __init__(
        self,
        js: JetStreamContext,
        *,
        subscribers: SubscribedAccounts,
        max_unacked: int,
        ack_wait: float,
    ) -> None:
        self._js = js
        self._subscribers = subscribers
        self._max_unacked = max_unacked
        self._ack_wait = ack_wait
        self._inactive = subscribers.inactive_days * DAY

    async def open(self, account_id: str, opening: Opening) -> Puller:
        """Creates (or resumes) the durable consumer; events published once this returns are kept for
        it (it returns about a second and a quarter after the account's mark: see subscribers.py)."""
        check_name(opening.name, "subscription_name")
        subjects = (
            [account_events_subject(account_id, t) for t in opening.event_types]  # type: ignore[arg-type]
            if opening.event_types
            else [account_events_filter(account_id)]
        )
        durable = consumer_name(account_id, opening.name)
        # Marked first; the caller hears the subscription exists once every router has seen the mark.
        await self._subscribers.mark(account_id)
        settled = time.monotonic() + self._subscribers.settle_seconds
        config = ConsumerConfig(
            durable_name=durable,
            filter_subjects=subjects,
            ack_policy=AckPolicy.EXPLICIT,
            deliver_policy=DeliverPolicy.NEW,
            max_ack_pending=self._max_unacked,
            ack_wait=self._ack_wait,
            inactive_threshold=self._inactive,
        )
        await self._js.add_consumer(ACCOUNT_EVENTS.name, config)
        subscription = await Puller.bind(self._js, stream=ACCOUNT_EVENTS.name, durable=durable)
        await asyncio.sleep(max(0.0, settled - time.monotonic()))
        return subscription

    async def follow(
        self,
        account_id: str,
        subscription: Puller,
        acks: AsyncIterator[Sequence[str]],
    ) -> AsyncIterator[ev.Event]:
        """The account's events, as they come; `acks` yields the event ids the client processed.
        What the client had not acknowledged when it leaves is sent again at once on its return."""
        pending: dict[str, Msg] = {}
        room = asyncio.Event()
        room.set()

        async def acknowledge() -> None:
            async for ids in acks:
                for event_id in ids:
                    message = pending.pop(event_id, None)
                    if message is not None:
                        await message.ack()
                room.set()

        acking = asyncio.create_task(acknowledge())
        marked_at = time.monotonic()
        try:
            while True:
                if time.monotonic() - marked_at > REMARK_SECONDS:
                    # A subscription followed longer than the marks live keeps its account's mark.
                    await self._subscribers.mark(account_id)
                    marked_at = time.monotonic()
                if acking.done():
                    acking.result()  # the client's errors surface here
                    return  # the client closed its side
                free = self._max_unacked - len(pending)
                if free <= 0:
                    room.clear()
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(room.wait(), self._ack_wait)
                    if len(pending) >= self._max_unacked:
                        # JetStream sends again what waited too long: forget our copies of them.
                        pending.clear()
                    continue
                for message in await fetch_batch(subscription, min(64, free), 1.0):
                    try:
                        event = ev.Event.FromString(message.data)
                    except DecodeError:
                        await message.term()
                        continue
                    if event.account_id != account_id:  # never: the subject names the account
                        await message.term()
                        continue
                    pending[event.event_id] = message
                    yield event
        finally:
            acking.cancel()
            with contextlib.suppress(Exception, asyncio.CancelledError):
                await acking
            for message in pending.values():
                with contextlib.suppress(Exception):
                    await message.nak()
            with contextlib.suppress(Exception):
                await subscription.unsubscribe()

    async def delete(self, account_id: str, name: str) -> None:
        check_name(name, "subscription_name")
        try:
            await self._js.delete_consumer(ACCOUNT_EVENTS.name, consumer_name(account_id, name))
        except NotFoundError:
            raise NotFound(f"Event subscription {name} does not exist.") from None


def opening_of(name: str, event_types: Sequence[int]) -> Opening:
    if not name:
        raise InvalidArgument("The first request must name the subscription.", field="subscription_name")
    return Opening(name, list(event_types))
