"""Feeds every email event on NATS into the events store."""

from __future__ import annotations

import logging

from google.protobuf.message import DecodeError
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from postmesh.common.bus import pull_forever
from postmesh.common.streams import EMAIL_EVENTS_SUBJECT, EVENTS
from postmesh.events.v1 import events_pb2
from services.feedback.timeline.store import EventStore

log = logging.getLogger(__name__)

CONSUMER = "feedback-events-store"


class EventRecorder:
    """A durable pull consumer on every email event subject, shared by the feedback replicas. A whole
    batch is stored in one transaction and acked only after it is committed; storing is idempotent by
    event id, so a redelivery stores nothing twice."""

    def __init__(self, js: JetStreamContext, store: EventStore, *, batch: int = 256) -> None:
        self._js = js
        self._store = store
        self._batch = batch

    async def run(self) -> None:
        config = ConsumerConfig(
            durable_name=CONSUMER,
            filter_subjects=[EMAIL_EVENTS_SUBJECT],
            ack_policy=AckPolicy.EXPLICIT,
            deliver_policy=DeliverPolicy.ALL,
            ack_wait=30,
            max_ack_pending=4096,
        )
        await pull_forever(self._js, EVENTS.name, config, self._process, batch=self._batch, wait_seconds=1)

    async def _process(self, messages: list[Msg]) -> None:
        events, parsed = [], []
        for message in messages:
            try:
                events.append(events_pb2.Event.FromString(message.data))
            except DecodeError:
                log.warning("not an Event; dropped", extra={"subject": message.subject})
                await message.term()
                continue
            parsed.append(message)
        try:
            await self._store.record(events)
        except Exception:
            for message in parsed:
                await message.nak(delay=1)
            raise
        for message in parsed:
            await message.ack()
