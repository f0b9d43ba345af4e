"""Feeds every email event on NATS into the events store."""

from __future__ import annotations

from nats.js import JetStreamContext

from postmesh.common.bus import consume_event_batches
from postmesh.common.streams import EMAIL_EVENTS_SUBJECT
from postmesh.events.v1 import events_pb2
from services.feedback.timeline.store import EventStore

CONSUMER = "feedback-events-store"


async def record_events(js: JetStreamContext, store: EventStore) -> None:
    """A durable consumer of every email event, shared by the feedback replicas: a whole batch is
    stored in one transaction, idempotently by event id, and acked once committed."""

    async def store_batch(events: list[events_pb2.Event]) -> None:
        await store.record(events)

    await consume_event_batches(js, durable=CONSUMER, subjects=[EMAIL_EVENTS_SUBJECT], handle=store_batch)
