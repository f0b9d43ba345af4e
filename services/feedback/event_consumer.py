"""The feedback service's one durable consumer of email events (wiring only: the steps are the
timeline's, the inbound side's and the destinations').

Each fetched batch is stored in the timeline, its Send events indexed for the inbound side, and put on
the account streams; then each event is routed to its configuration set's destinations and its
identity's notification topics. One consumer instead of one per step: each event is fetched, decoded
and acknowledged once. Every step is idempotent by event id (timeline and sent index ON CONFLICT DO
NOTHING, account-stream publishes de-duplicated by Nats-Msg-Id, one outbox row per destination and
event), which at-least-once delivery and consume_events_batched's retries rely on.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from nats.js import JetStreamContext

from postmesh.common.bus import consume_events_batched
from postmesh.common.streams import EMAIL_EVENTS_SUBJECT
from postmesh.events.v1 import events_pb2 as ev
from services.feedback.destinations.routing import EventRouter
from services.feedback.inbound.storage import SentMessages
from services.feedback.inbound.wiring import sent_mails
from services.feedback.timeline.store import EventStore

CONSUMER = "feedback-events"
# The durables of earlier releases, one per step (timeline, sent index, router), that this one
# replaces: created, it starts where the least advanced of them stands, and the server deletes them
# once no replica of an earlier release has read them for REPLACED_IDLE_SECONDS.
REPLACED = ("feedback-events-store", "feedback-sent-index", "feedback-destinations")
REPLACED_IDLE_SECONDS = 300.0
# Events per fetch: with a worker process or two per machine, under the durable's max_ack_pending
# (the server's default, 1000).
BATCH = 256


class FeedbackEvents:
    def __init__(self, *, timeline: EventStore, sent: SentMessages, router: EventRouter) -> None:
        self._timeline = timeline
        self._sent = sent
        self._router = router

    async def _store(self, events: list[ev.Event]) -> None:
        await self._timeline.record(events)
        await self._sent.record_many(sent_mails(events))

    async def handle_batch(self, events: list[ev.Event]) -> None:
        """The database writes and the account-stream publishes overlap: a batch waits for the slower
        of them, not their sum. Raises the first failure once both are done."""
        results = await asyncio.gather(
            self._store(events), self._router.publish(events), return_exceptions=True
        )
        for result in results:
            if isinstance(result, BaseException):
                raise result

    async def handle_event(self, event: ev.Event) -> None:
        await self._router.route(event)


async def consume_feedback_events(
    js: JetStreamContext,
    steps: FeedbackEvents,
    *,
    durable: str = CONSUMER,
    subjects: Sequence[str] = (EMAIL_EVENTS_SUBJECT,),
    replaces: Sequence[str] = REPLACED,
    replaced_idle_seconds: float = REPLACED_IDLE_SECONDS,
    max_deliver: int = 10,
    retry_delay: float = 5.0,
) -> None:
    """Runs in every worker process (a durable pull consumer: each batch goes to one of them). A
    batch that fails is taken apart, so a bad event is retried alone and dropped after `max_deliver`
    tries (see consume_events_batched)."""
    await consume_events_batched(
        js,
        durable=durable,
        subjects=subjects,
        handle_batch=steps.handle_batch,
        handle_event=steps.handle_event,
        batch=BATCH,
        max_deliver=max_deliver,
        retry_delay=retry_delay,
        replaces=replaces,
        replaced_idle_seconds=replaced_idle_seconds,
    )
