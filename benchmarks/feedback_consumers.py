"""Micro-benchmark of the feedback service's event consumers: CPU per event, one event at a time
(consume_events, as before issue 11's batching) against a batch at a time (consume_events_batched) for
the sent index and the router; the timeline's multi-row INSERT rebuilt per batch against its cached
executemany; and the three durables (timeline, sent index, router) against the one that replaced them
(services/feedback/event_consumer.py).

    .venv/bin/python benchmarks/feedback_consumers.py [--messages 3000] [--runs 3] [--consumer feedback]

Each run starts a private nats-server and a fresh SQLite database, fills the events stream with what the
bench's messages publish (a Send and a Delivery each, from a verified identity, no configuration set),
then lets the consumers drain it; `one-durable-unsubscribed` is the one consumer when none of the
events' accounts has a SubscribeEvents subscription (no account-stream copies). CPU is this process's
(event loop, nats-py, aiosqlite's thread; not nats-server's), from the consumers' start until every
durable has nothing pending or unacknowledged, divided by the events in the stream's subjects they read
(Send events for the index, every email event for the others). Each path runs once uncounted first
(SQLAlchemy's one-time set-up); then the two paths alternate, so that the machine's noise falls on both.
The earlier paths are the code before each change, kept here: SentMessages.record's get-then-add
transaction, EventRouter.handle's awaited publish before the routing, EventStore.record's multi-row
INSERT built per batch.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable, Coroutine
from pathlib import Path
from typing import Any

import nats
from sqlalchemy import func, select
from sqlalchemy.dialects import sqlite
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

import services.feedback.settings  # noqa: F401 - registers the service's settings
from postmesh.common import db
from postmesh.common.bus import (
    consume_event_batches,
    consume_events,
    consume_events_batched,
    ensure_streams,
    new_event,
)
from postmesh.common.natsserver import NatsServerProcess
from postmesh.common.protoutil import from_timestamp
from postmesh.common.service import Clock, SystemClock
from postmesh.common.streams import EMAIL_EVENTS_SUBJECT, EVENTS, account_events_subject, email_event_subject
from postmesh.events.v1 import events_pb2 as ev
from services.feedback.configsets import ConfigurationSets
from services.feedback.destinations.notifications import NONE, IdentityNotifications, NotificationSettings
from services.feedback.destinations.routing import EventRouter
from services.feedback.destinations.subscribers import SubscribedAccounts
from services.feedback.destinations.webhooks import WebhookOutbox
from services.feedback.event_consumer import FeedbackEvents, consume_feedback_events
from services.feedback.inbound.storage import SentMessages, header_message_id
from services.feedback.inbound.wiring import sent_mails
from services.feedback.models import Base, SentMessage
from services.feedback.service import FeedbackService
from services.feedback.timeline.models import EmailEventRecipient, StoredEmailEvent
from services.feedback.timeline.store import EventStore, recipients_of, storable, type_name

# What each consumer's paths are called: the earlier code first.
PATHS = {
    "sent-index": ("per-event", "batch"),
    "routing": ("per-event", "batch"),
    "timeline": ("multi-values", "executemany"),
    # The middle one: the three durables with the timeline's executemany (what the one consumer saves).
    # The last: the one durable when no account has a SubscribeEvents subscription (no account-stream
    # copies); every other path has all the events' accounts subscribed, as every account was before.
    "feedback": ("three-durables", "three-durables-executemany", "one-durable", "one-durable-unsubscribed"),
}


def events_of(messages: int) -> list[ev.Event]:
    events = []
    now = dt.datetime.now(dt.UTC)
    for i in range(messages):
        mail = ev.Mail(
            message_id=f"0100{i:012d}-bench",
            source="sender@example.test",
            source_identity="example.test",
            destination=[f"r{i}@example.test"],
            headers=[ev.Header(name="Message-ID", value=f"<m{i}@example.test>")],
        )
        mail.timestamp.FromDatetime(now)
        for kind in (ev.EMAIL_EVENT_TYPE_SEND, ev.EMAIL_EVENT_TYPE_DELIVERY):
            events.append(
                new_event(f"acct{i % 10}", time=now, email=ev.EmailEvent(event_type=kind, mail=mail))
            )
    return events


async def old_timeline_record(
    sessions: async_sessionmaker[AsyncSession], clock: Clock, events: list[ev.Event]
) -> int:
    """EventStore.record before the cached executemany: multi-row INSERTs of 200 rows built (and so
    compiled) for every batch."""
    insert = sqlite.insert
    wanted = {e.event_id: e for e in events if storable(e)}
    if not wanted:
        return 0
    rows = [
        {
            "event_id": e.event_id,
            "account_id": e.account_id,
            "message_id": e.email.mail.message_id[:128],
            "event_type": type_name(e.email.event_type),
            "event_time": e.time.ToDatetime(tzinfo=dt.UTC) if e.HasField("time") else clock.now(),
            "payload": e.SerializeToString(),
        }
        for e in wanted.values()
    ]
    stored = 0
    async with db.transaction(sessions) as session:
        for start in range(0, len(rows), 200):
            inserted = (
                await session.execute(
                    insert(StoredEmailEvent)
                    .values(rows[start : start + 200])
                    .on_conflict_do_nothing(index_elements=["event_id"])
                    .returning(StoredEmailEvent.id, StoredEmailEvent.event_id)
                )
            ).all()
            recipients = [
                {"event_row_id": row_id, "account_id": wanted[event_id].account_id, "address_key": key[:320]}
                for row_id, event_id in inserted
                for key in recipients_of(wanted[event_id].email)
            ]
            for chunk in range(0, len(recipients), 200):
                await session.execute(insert(EmailEventRecipient).values(recipients[chunk : chunk + 200]))
            stored += len(inserted)
    return stored


async def lookup(account_id: str, identity: str) -> NotificationSettings:
    return NONE  # what the identity service answers for an identity without notification topics


async def one_run(workdir: Path, messages: int, consumer: str, path: str) -> dict[str, float]:
    server = NatsServerProcess(workdir / "nats").start()
    engine = db.create_engine(f"sqlite+aiosqlite:///{workdir / 'feedback.db'}")
    connection = await nats.connect(server.url)
    try:
        js = connection.jetstream()
        await ensure_streams(js)
        assert FeedbackService.migrations_dir is not None
        await db.migrate(engine, FeedbackService.migrations_dir, "alembic_version_feedback", Base.metadata)
        sessions = db.session_factory(engine)
        clock = SystemClock()
        events = events_of(messages)
        pending = [
            js.publish(
                email_event_subject(e.email.event_type),
                e.SerializeToString(),
                headers={"Nats-Msg-Id": e.event_id},
            )
            for e in events
        ]
        for start in range(0, len(pending), 500):
            await asyncio.gather(*pending[start : start + 500])

        index = SentMessages(sessions, clock)

        async def old_record(event: ev.Event) -> None:
            # SentMessages.record before the batching: a get, then an add, one transaction per event.
            if event.WhichOneof("payload") != "email" or event.email.event_type != ev.EMAIL_EVENT_TYPE_SEND:
                return
            mail = event.email.mail
            async with db.transaction(sessions) as session:
                if await session.get(SentMessage, mail.message_id) is not None:
                    return
                session.add(
                    SentMessage(
                        message_id=mail.message_id,
                        account_id=event.account_id,
                        header_message_id=header_message_id(mail),
                        mail=mail.SerializeToString(),
                        sent_at=from_timestamp(mail.timestamp) or clock.now(),
                    )
                )

        async def new_index(batch: list[ev.Event]) -> None:
            await index.record_many(sent_mails(batch))

        async def changed(account_id: str, name: str) -> None:
            pass

        subscribers = SubscribedAccounts(js)
        if path != "one-durable-unsubscribed":
            for account_id in {e.account_id for e in events}:
                await subscribers.mark(account_id)
        router = EventRouter(
            js=js,
            nats=connection,
            sets=ConfigurationSets(sessions, clock, changed=changed),
            outbox=WebhookOutbox(
                sessions, clock, retry_period=dt.timedelta(hours=1), backoff=1.0, backoff_max=1.0
            ),
            subject_prefix="user",
            queued=lambda: None,
            notifications=IdentityNotifications(lookup),
            subscribers=subscribers,
        )

        async def old_route(event: ev.Event) -> None:
            # EventRouter.handle before the batching: an awaited publish, then the routing.
            if event.WhichOneof("payload") != "email" or not event.account_id:
                return
            await js.publish(
                account_events_subject(event.account_id, event.email.event_type),
                event.SerializeToString(),
                headers={"Nats-Msg-Id": event.event_id},
            )
            await router.route(event)

        timeline = EventStore(sessions, clock)

        async def old_timeline(batch: list[ev.Event]) -> None:
            await old_timeline_record(sessions, clock, batch)

        async def new_timeline(batch: list[ev.Event]) -> None:
            await timeline.record(batch)

        send_subject = [email_event_subject(ev.EMAIL_EVENT_TYPE_SEND)]
        every = [EMAIL_EVENTS_SUBJECT]
        durable = f"bench-{consumer}"
        Run = Callable[[], Coroutine[Any, Any, None]]

        def three_durables(store: Callable[[list[ev.Event]], Awaitable[None]]) -> dict[str, Run]:
            return {
                "bench-timeline": lambda: consume_event_batches(
                    js, durable="bench-timeline", subjects=every, handle=store
                ),
                "bench-sent-index": lambda: consume_events_batched(
                    js, durable="bench-sent-index", subjects=send_subject, handle_batch=new_index, batch=256
                ),
                "bench-routing": lambda: consume_events_batched(
                    js,
                    durable="bench-routing",
                    subjects=every,
                    handle_batch=router.publish,
                    handle_event=router.route,
                ),
            }

        def one_durable() -> Coroutine[Any, Any, None]:
            steps = FeedbackEvents(timeline=timeline, sent=index, router=router)
            return consume_feedback_events(js, steps, durable=durable, replaces=())

        runs: dict[tuple[str, str], dict[str, Run]] = {
            ("sent-index", "per-event"): {
                durable: lambda: consume_events(js, durable=durable, subjects=send_subject, handle=old_record)
            },
            ("sent-index", "batch"): {
                durable: lambda: consume_events_batched(
                    js, durable=durable, subjects=send_subject, handle_batch=new_index, batch=256
                )
            },
            ("routing", "per-event"): {
                durable: lambda: consume_events(js, durable=durable, subjects=every, handle=old_route)
            },
            ("routing", "batch"): {
                durable: lambda: consume_events_batched(
                    js,
                    durable=durable,
                    subjects=every,
                    handle_batch=router.publish,
                    handle_event=router.route,
                )
            },
            ("timeline", "multi-values"): {
                durable: lambda: consume_event_batches(
                    js, durable=durable, subjects=every, handle=old_timeline
                )
            },
            ("timeline", "executemany"): {
                durable: lambda: consume_event_batches(
                    js, durable=durable, subjects=every, handle=new_timeline
                )
            },
            # As integ had them before the one consumer: three durables, each its own fetches and acks.
            ("feedback", "three-durables"): three_durables(old_timeline),
            ("feedback", "three-durables-executemany"): three_durables(new_timeline),
            ("feedback", "one-durable"): {durable: one_durable},
            ("feedback", "one-durable-unsubscribed"): {durable: one_durable},
        }
        handed = messages if consumer == "sent-index" else len(events)
        consumers = runs[consumer, path]
        wall, cpu = time.perf_counter(), time.process_time()
        tasks = [asyncio.create_task(run()) for run in consumers.values()]
        waiting = set(consumers)
        while waiting:
            await asyncio.sleep(0.05)
            for name in list(waiting):
                with contextlib.suppress(Exception):  # the consumer may not be declared yet
                    info = await js.consumer_info(EVENTS.name, name)
                    if info.num_pending == 0 and info.num_ack_pending == 0 and info.delivered.stream_seq > 0:
                        waiting.discard(name)
        cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        async with sessions() as session:
            indexed = len((await session.scalars(select(SentMessage.message_id))).all())
            stored = await session.scalar(select(func.count()).select_from(StoredEmailEvent))
        assert consumer not in ("sent-index", "feedback") or indexed == messages, indexed
        assert consumer not in ("timeline", "feedback") or stored == len(events), stored
        return {"events": handed, "cpu": cpu, "wall": wall}
    finally:
        await connection.close()
        await engine.dispose()
        server.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else "")
    parser.add_argument("--messages", type=int, default=3000, help="messages whose events are consumed")
    parser.add_argument(
        "--runs", type=int, default=3, help="runs of each path, each on a fresh stream and database"
    )
    parser.add_argument("--consumer", choices=[*PATHS, "all"], default="all")
    parser.add_argument("--path", default="", help="only this path of the consumer (e.g. one-durable)")
    args = parser.parse_args()
    consumers = list(PATHS) if args.consumer == "all" else [args.consumer]
    for consumer in consumers:
        paths = [p for p in PATHS[consumer] if not args.path or p == args.path]
        results: dict[str, list[dict[str, float]]] = {path: [] for path in paths}
        for path in results:  # not counted: SQLAlchemy's mapper set-up and first compilations
            with tempfile.TemporaryDirectory(prefix="postmesh-fbbench-") as tmp:
                asyncio.run(one_run(Path(tmp), 200, consumer, path))
        for run in range(args.runs):
            for path in results:
                with tempfile.TemporaryDirectory(prefix="postmesh-fbbench-") as tmp:
                    result = asyncio.run(one_run(Path(tmp), args.messages, consumer, path))
                results[path].append(result)
                print(
                    f"{consumer} {path} run {run + 1}: {result['events']:.0f} events, "
                    f"{result['cpu'] / result['events'] * 1e6:.0f} µs CPU and "
                    f"{result['wall'] / result['events'] * 1e6:.0f} µs wall per event"
                )
        for path, rows in results.items():
            cpu = sorted(r["cpu"] / r["events"] * 1e6 for r in rows)
            wall = sorted(r["wall"] / r["events"] * 1e6 for r in rows)
            print(
                f"{consumer} {path}: CPU per event min {cpu[0]:.0f} median {statistics.median(cpu):.0f} "
                f"max {cpu[-1]:.0f} µs; wall median {statistics.median(wall):.0f} µs"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
