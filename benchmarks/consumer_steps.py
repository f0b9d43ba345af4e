"""Micro-benchmark of the email-event consumers' steps, without the consume loop around them: CPU per
event of the timeline's EventStore.record, the sent index's SentMessages.record_many, the router's
EventRouter.publish (the account streams) and the quota statistics' SendStatistics.record, each
handed batches of 256 events as the durables fetch them.

    PYTHONPATH=. .venv/bin/python benchmarks/consumer_steps.py [--messages 4000] [--runs 5]

A fresh SQLite database (and, for the router, a private nats-server) per run; the events are the
bench's (a Send and a Delivery per message, one recipient each). CPU is this process's
(time.process_time: the event loop and aiosqlite's thread; not nats-server's). To compare two
versions of the code, run this file with each tree first on PYTHONPATH, alternating.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import nats

import services.feedback.settings
import services.quota.settings  # noqa: F401 - registers the service's settings
from postmesh.common import db
from postmesh.common.bus import EventPublisher, ensure_streams, new_event
from postmesh.common.config import load_settings
from postmesh.common.natsserver import NatsServerProcess
from postmesh.common.service import SystemClock
from postmesh.events.v1 import events_pb2 as ev
from services.feedback.configsets import ConfigurationSets
from services.feedback.destinations.notifications import NONE, IdentityNotifications, NotificationSettings
from services.feedback.destinations.routing import EventRouter
from services.feedback.destinations.subscribers import SubscribedAccounts
from services.feedback.destinations.webhooks import WebhookOutbox
from services.feedback.inbound.storage import SentMessages
from services.feedback.inbound.wiring import sent_mails
from services.feedback.models import Base as FeedbackBase
from services.feedback.service import FeedbackService
from services.feedback.timeline.store import EventStore
from services.quota.accounts import QuotaAccounts
from services.quota.models import Base as QuotaBase
from services.quota.notify import Notifier
from services.quota.service import QuotaService
from services.quota.statistics import SendStatistics

BATCH = 256
STEPS = ("timeline", "sent-index", "account-streams", "statistics")


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
    return NONE


async def cpu_per_event(step: Callable[[list[ev.Event]], Awaitable[object]], events: list[ev.Event]) -> float:
    start = time.process_time()
    for first in range(0, len(events), BATCH):
        await step(events[first : first + BATCH])
    return (time.process_time() - start) / len(events)


async def one_run(workdir: Path, messages: int) -> dict[str, float]:
    events = events_of(messages)
    clock = SystemClock()
    figures: dict[str, float] = {}

    feedback = db.create_engine(f"sqlite+aiosqlite:///{workdir / 'feedback.db'}")
    quota = db.create_engine(f"sqlite+aiosqlite:///{workdir / 'quota.db'}")
    server = NatsServerProcess(workdir / "nats").start()
    connection = await nats.connect(server.url)
    try:
        js = connection.jetstream()
        await ensure_streams(js)
        assert FeedbackService.migrations_dir is not None and QuotaService.migrations_dir is not None
        await db.migrate(
            feedback, FeedbackService.migrations_dir, "alembic_version_feedback", FeedbackBase.metadata
        )
        await db.migrate(quota, QuotaService.migrations_dir, "alembic_version_quota", QuotaBase.metadata)
        sessions = db.session_factory(feedback)
        timeline = EventStore(sessions, clock)
        index = SentMessages(sessions, clock)

        async def changed(account_id: str, name: str) -> None:
            pass

        subscribers = SubscribedAccounts(js)
        for i in range(10):  # every account subscribed: the router copies every event, as it used to
            await subscribers.mark(f"acct{i}")
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
        quota_sessions = db.session_factory(quota)
        settings = load_settings({})
        accounts = QuotaAccounts(
            quota_sessions, clock, settings, Notifier(EventPublisher(js), js, settings, clock)
        )
        for i in range(10):
            await accounts.state(f"acct{i}")
        sendstats = SendStatistics(quota_sessions, clock, settings, accounts)

        async def index_batch(batch: list[ev.Event]) -> None:
            await index.record_many(sent_mails(batch))

        steps: dict[str, Callable[[list[ev.Event]], Awaitable[object]]] = {
            "timeline": timeline.record,
            "sent-index": index_batch,
            "account-streams": router.publish,
            "statistics": sendstats.record,
        }
        warm = events_of(BATCH // 2)  # not counted: SQLAlchemy's first compilations
        for name, step in steps.items():
            await step(warm)
            figures[name] = await cpu_per_event(step, events)
    finally:
        await connection.close()
        await feedback.dispose()
        await quota.dispose()
        server.stop()
    return figures


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else "")
    parser.add_argument(
        "--messages", type=int, default=4000, help="messages whose two events each step is handed"
    )
    parser.add_argument("--runs", type=int, default=5, help="runs, each on a fresh database and server")
    args = parser.parse_args()
    results: dict[str, list[float]] = {name: [] for name in STEPS}
    for _ in range(args.runs):
        with tempfile.TemporaryDirectory(prefix="postmesh-stepbench-") as tmp:
            for name, cpu in asyncio.run(one_run(Path(tmp), args.messages)).items():
                results[name].append(cpu * 1e6)
    for name, values in results.items():
        values.sort()
        print(
            f"{name}: CPU per event min {values[0]:.1f} median {statistics.median(values):.1f} "
            f"max {values[-1]:.1f} µs"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
