"""Micro-benchmark of the feedback service's sent-index and event-routing consumers: CPU per event, one
event at a time (consume_events, as before issue 11's batching) against a batch at a time
(consume_events_batched).

    .venv/bin/python benchmarks/feedback_consumers.py [--messages 3000] [--runs 3]

Each run starts a private nats-server and a fresh SQLite database, fills the events stream with what
the bench's messages publish (a Send and a Delivery each, from a verified identity, no configuration
set), then lets one consumer drain it. CPU is this process's (event loop, nats-py, aiosqlite's thread;
not nats-server's), from the consumer's start until the durable has nothing pending or unacknowledged,
divided by the events the consumer is handed (Send events for the index, every email event for the
router). Each path runs once uncounted first (SQLAlchemy's one-time set-up); then the two paths
alternate, so that the machine's noise falls on both. The per-event paths are the code before the
batching, kept here: SentMessages.record's get-then-add transaction, EventRouter.handle's awaited
publish before the routing.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import statistics
import tempfile
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import nats
from sqlalchemy import select

import services.feedback.settings  # noqa: F401 - registers the service's settings
from postmesh.common import db
from postmesh.common.bus import consume_events, consume_events_batched, ensure_streams, new_event
from postmesh.common.natsserver import NatsServerProcess
from postmesh.common.protoutil import from_timestamp
from postmesh.common.service import SystemClock
from postmesh.common.streams import EMAIL_EVENTS_SUBJECT, EVENTS, account_events_subject, email_event_subject
from postmesh.events.v1 import events_pb2 as ev
from services.feedback.configsets import ConfigurationSets
from services.feedback.destinations.notifications import NONE, IdentityNotifications, NotificationSettings
from services.feedback.destinations.routing import EventRouter
from services.feedback.destinations.webhooks import WebhookOutbox
from services.feedback.inbound.storage import SentMessages, header_message_id
from services.feedback.inbound.wiring import SENT_INDEX_BATCH, sent_mails
from services.feedback.models import Base, SentMessage
from services.feedback.service import FeedbackService


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

        send_subject = [email_event_subject(ev.EMAIL_EVENT_TYPE_SEND)]
        durable = f"bench-{consumer}"
        runs: dict[tuple[str, str], Callable[[], Coroutine[Any, Any, None]]] = {
            ("sent-index", "per-event"): lambda: consume_events(
                js, durable=durable, subjects=send_subject, handle=old_record
            ),
            ("sent-index", "batch"): lambda: consume_events_batched(
                js, durable=durable, subjects=send_subject, handle_batch=new_index, batch=SENT_INDEX_BATCH
            ),
            ("routing", "per-event"): lambda: consume_events(
                js, durable=durable, subjects=[EMAIL_EVENTS_SUBJECT], handle=old_route
            ),
            ("routing", "batch"): lambda: consume_events_batched(
                js,
                durable=durable,
                subjects=[EMAIL_EVENTS_SUBJECT],
                handle_batch=router.publish,
                handle_event=router.route,
            ),
        }
        handed = messages if consumer == "sent-index" else len(events)
        wall, cpu = time.perf_counter(), time.process_time()
        task = asyncio.create_task(runs[consumer, path]())
        while True:
            await asyncio.sleep(0.05)
            with contextlib.suppress(Exception):  # the consumer may not be declared yet
                info = await js.consumer_info(EVENTS.name, durable)
                if info.num_pending == 0 and info.num_ack_pending == 0 and info.delivered.stream_seq > 0:
                    break
        cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        async with sessions() as session:
            indexed = len((await session.scalars(select(SentMessage.message_id))).all())
        assert consumer != "sent-index" or indexed == messages, indexed
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
    parser.add_argument("--consumer", choices=["sent-index", "routing", "both"], default="both")
    args = parser.parse_args()
    consumers = ["sent-index", "routing"] if args.consumer == "both" else [args.consumer]
    for consumer in consumers:
        results: dict[str, list[dict[str, float]]] = {"per-event": [], "batch": []}
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
