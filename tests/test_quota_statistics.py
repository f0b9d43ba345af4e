"""The quota service's statistics consumer: handed only the email events it counts, an existing
durable with the old filter updated in place (nothing lost, nothing counted twice), each event counted
once however often and in whichever batches it arrives, and reputation judged from a durable list of
accounts that survives a restart; on SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import datetime as dt
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import nats
import pytest
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from nats.js.errors import NotFoundError

import services.quota.settings  # noqa: F401 - registers the service's settings
from postmesh.common import db
from postmesh.common.bus import EventPublisher, ensure_streams
from postmesh.common.config import load_settings
from postmesh.common.natsserver import NatsServerProcess
from postmesh.common.streams import EMAIL_EVENTS_SUBJECT, EVENTS
from postmesh.events.v1 import events_pb2 as ev
from services.quota.accounts import HEALTHY, PROBATION, QuotaAccounts
from services.quota.models import Base
from services.quota.notify import Notifier
from services.quota.service import QuotaService
from services.quota.statistics import (
    CONSUMER,
    COUNTED_SUBJECTS,
    EventConsumer,
    ReputationJudge,
    SendStatistics,
    counted,
)
from tests.quota_helpers import ManualClock, email_event

START = dt.datetime(2026, 3, 2, 10, 7, tzinfo=dt.UTC)
HOUR = START.replace(minute=0)
Point = tuple[str, int, int, int, int, int]


@pytest.fixture
def private_nats(tmp_path: Path) -> Iterator[str]:
    """A nats-server of this test's own: the durable consumer's state is the test's subject."""
    server = NatsServerProcess(tmp_path / "nats").start()
    yield server.url
    server.stop()


@pytest.fixture
async def js(private_nats: str) -> AsyncIterator[JetStreamContext]:
    connection = await nats.connect(private_nats)
    jetstream = connection.jetstream()
    await ensure_streams(jetstream)
    yield jetstream
    await connection.close()


@asynccontextmanager
async def quota_process(
    database_url: str, js: JetStreamContext, clock: ManualClock, **settings: Any
) -> AsyncIterator[tuple[SendStatistics, QuotaAccounts]]:
    """The statistics and accounts of one quota-service process on `database_url` (migrated)."""
    engine = db.create_engine(database_url)
    assert QuotaService.migrations_dir is not None
    await db.migrate(engine, QuotaService.migrations_dir, "alembic_version_quota", Base.metadata)
    sessions = db.session_factory(engine)
    loaded = load_settings({}, **settings)
    notifier = Notifier(EventPublisher(js), js, loaded, clock)
    accounts = QuotaAccounts(sessions, clock, loaded, notifier)
    try:
        yield SendStatistics(sessions, clock, loaded, accounts), accounts
    finally:
        await engine.dispose()


async def points(statistics: SendStatistics, account_id: str) -> list[Point]:
    return [
        (p.slot_start.strftime("%H:%M"), p.delivery_attempts, p.bounces, p.complaints, p.rejects, p.held)
        for p in await statistics.data_points(account_id)
    ]


async def publish(js: JetStreamContext, events: list[ev.Event]) -> None:
    publisher = EventPublisher(js)
    for event in events:
        await publisher.publish(event)


async def counted_until(
    js: JetStreamContext, statistics: SendStatistics, account_id: str, expected: list[Point]
) -> list[Point]:
    """The account's data points once they are as expected and the consumer has nothing left to do
    (or what they are after a generous wait)."""
    deadline = time.monotonic() + 60
    while True:
        now = await points(statistics, account_id)
        try:
            info = await js.consumer_info(EVENTS.name, CONSUMER)
            idle = info.num_pending == 0 and info.num_ack_pending == 0
        except NotFoundError:  # not declared yet
            idle = False
        if (now == expected and idle) or time.monotonic() > deadline:
            return now
        await asyncio.sleep(0.1)


@asynccontextmanager
async def consuming(js: JetStreamContext, statistics: SendStatistics) -> AsyncIterator[None]:
    task = asyncio.create_task(EventConsumer(js, statistics).run())
    try:
        yield
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


def reject(account_id: str, at: dt.datetime, sent_at: dt.datetime) -> ev.Event:
    event = email_event(account_id, ev.EMAIL_EVENT_TYPE_REJECT, at)
    event.email.mail.timestamp.FromDatetime(sent_at)
    return event


def held(account_id: str, at: dt.datetime) -> ev.Event:
    return email_event(account_id, ev.EMAIL_EVENT_TYPE_HOLD, at, hold=ev.Hold(action=ev.HOLD_ACTION_HELD))


async def test_each_event_is_counted_once_whatever_its_batches(
    database_url: str, js: JetStreamContext
) -> None:
    async with quota_process(database_url, js, ManualClock(START)) as (statistics, _):
        send = email_event("acct-a", ev.EMAIL_EVENT_TYPE_SEND, HOUR, recipients=3)
        bounce = email_event("acct-a", ev.EMAIL_EVENT_TYPE_BOUNCE, HOUR + dt.timedelta(minutes=20))
        rejected = reject("acct-a", HOUR + dt.timedelta(minutes=31), sent_at=HOUR)
        other = email_event("acct-b", ev.EMAIL_EVENT_TYPE_COMPLAINT, HOUR)
        delivery = email_event("acct-a", ev.EMAIL_EVENT_TYPE_DELIVERY, HOUR)
        # The sender republishes an event past the stream's duplicate window: twice in one batch...
        assert await statistics.record([send, bounce, send, delivery, other, bounce]) == {"acct-a", "acct-b"}
        # ...and again in later ones, beside events new to the count.
        later = held("acct-a", HOUR + dt.timedelta(minutes=32))
        assert await statistics.record([other, send, rejected, later, rejected]) == {"acct-a"}
        assert await statistics.record([send, bounce, rejected, later, delivery]) == set()
        # The reject leaves the delivery attempts of the interval its message was sent in.
        assert await points(statistics, "acct-a") == [
            ("10:00", 2, 0, 0, 0, 0),
            ("10:15", 0, 1, 0, 0, 0),
            ("10:30", 0, 0, 0, 1, 1),
        ]
        assert await points(statistics, "acct-b") == [("10:00", 0, 0, 1, 0, 0)]

        # More events than one statement's rows: still each once.
        many = [email_event("acct-c", ev.EMAIL_EVENT_TYPE_SEND, HOUR) for _ in range(2500)]
        assert await statistics.record(many[:1800] + many[:700]) == {"acct-c"}
        assert await statistics.record(many[1000:] + many[:10]) == {"acct-c"}
        assert await statistics.record(many) == set()
        assert await points(statistics, "acct-c") == [("10:00", 2500, 0, 0, 0, 0)]


async def test_pending_judgements_survive_a_restart(
    database_url: str, js: JetStreamContext, monkeypatch: pytest.MonkeyPatch
) -> None:
    clock = ManualClock(START)
    settings = {"reputation_min_volume": 20}
    async with quota_process(database_url, js, clock, **settings) as (statistics, accounts):
        for account_id in ("acct-a", "acct-b"):
            await accounts.state(account_id)  # the row its first reservation made
        sends = email_event("acct-a", ev.EMAIL_EVENT_TYPE_SEND, START, recipients=20)
        bounce = email_event("acct-a", ev.EMAIL_EVENT_TYPE_BOUNCE, START)  # 5%: under review
        await statistics.record([sends, bounce, held("acct-b", START)])
        # The process stops here, before its judge's next round.
    async with quota_process(database_url, js, clock, **settings) as (statistics, accounts):
        assert (await accounts.state("acct-a")).quota.enforcement_status == HEALTHY
        judge = ReputationJudge(statistics, 60.0)
        # Only acct-a: a held message is no part of reputation.
        assert await judge.run_once() == 1
        assert (await accounts.state("acct-a")).quota.enforcement_status == PROBATION
        assert await judge.run_once() == 0  # judged: no longer pending

        # Counted while the judge is at work: judged again in the next round, not forgotten.
        evaluate = statistics.evaluate

        async def evaluate_while_counting(account_id: str) -> None:
            await statistics.record([email_event(account_id, ev.EMAIL_EVENT_TYPE_SEND, START, recipients=80)])
            await evaluate(account_id)

        await statistics.record([email_event("acct-a", ev.EMAIL_EVENT_TYPE_COMPLAINT, clock.now())])
        monkeypatch.setattr(statistics, "evaluate", evaluate_while_counting)
        assert await judge.run_once() == 1
        monkeypatch.setattr(statistics, "evaluate", evaluate)
        assert await judge.run_once() == 1
        # 1 bounce and 1 complaint in 100: 1% is below the bounce review rate, above the complaint
        # pause rate.
        state = (await accounts.state("acct-a")).quota
        assert (state.enforcement_status, state.sending_enabled) == ("SHUTDOWN", False)
        assert await judge.run_once() == 0


async def test_the_consumer_is_handed_only_the_events_it_counts(tmp_path: Path, js: JetStreamContext) -> None:
    database_url = f"sqlite+aiosqlite:///{tmp_path / 'quota.db'}"
    async with quota_process(database_url, js, ManualClock(START)) as (statistics, _):
        kinds = (
            ev.EMAIL_EVENT_TYPE_DELIVERY,
            ev.EMAIL_EVENT_TYPE_OPEN,
            ev.EMAIL_EVENT_TYPE_CLICK,
            ev.EMAIL_EVENT_TYPE_DELIVERY_DELAY,
        )
        uncounted = [email_event("acct-a", kinds[i % len(kinds)], HOUR) for i in range(400)]
        counted = [
            email_event("acct-a", ev.EMAIL_EVENT_TYPE_SEND, HOUR, recipients=2),
            email_event("acct-a", ev.EMAIL_EVENT_TYPE_BOUNCE, HOUR),
            email_event("acct-a", ev.EMAIL_EVENT_TYPE_COMPLAINT, HOUR),
            reject("acct-a", HOUR, sent_at=HOUR),
            held("acct-a", HOUR),
        ]
        await publish(js, uncounted[:200] + counted + uncounted[200:])
        async with consuming(js, statistics):
            expected = [("10:00", 1, 1, 1, 1, 1)]
            assert await counted_until(js, statistics, "acct-a", expected) == expected
        info = await js.consumer_info(EVENTS.name, CONSUMER)
        assert info.config.filter_subjects == list(COUNTED_SUBJECTS)
        # Not one of the 400 others was delivered to it.
        assert info.delivered.consumer_seq == len(counted)


async def test_a_durable_with_the_old_filter_is_updated_in_place(
    tmp_path: Path, js: JetStreamContext
) -> None:
    database_url = f"sqlite+aiosqlite:///{tmp_path / 'quota.db'}"
    async with quota_process(database_url, js, ManualClock(START)) as (statistics, _):

        def day(sends: int) -> list[ev.Event]:
            events = []
            for i in range(sends):
                events.append(email_event("acct-a", ev.EMAIL_EVENT_TYPE_SEND, HOUR))
                events.append(email_event("acct-a", ev.EMAIL_EVENT_TYPE_DELIVERY, HOUR))
                if i % 10 == 0:
                    events.append(email_event("acct-a", ev.EMAIL_EVENT_TYPE_BOUNCE, HOUR))
            return events

        # The durable as an earlier release declared it: every email event.
        old = ConsumerConfig(
            durable_name=CONSUMER,
            filter_subjects=[EMAIL_EVENTS_SUBJECT],
            ack_policy=AckPolicy.EXPLICIT,
            deliver_policy=DeliverPolicy.ALL,
            ack_wait=30,
            max_ack_pending=4096,
        )
        await js.add_consumer(EVENTS.name, old)
        await publish(js, day(30))  # 30 sends, 3 bounces, 30 deliveries
        # Its last batch: counted, but only part of it acknowledged when the process stopped. (Killed,
        # the rest would come back after the ack wait; given back, it comes back at once.)
        subscription = await js.pull_subscribe_bind(durable=CONSUMER, stream=EVENTS.name)
        batch = await subscription.fetch(40, timeout=5)
        assert len(batch) == 40
        await statistics.record([ev.Event.FromString(m.data) for m in batch])
        for message in batch[:25]:
            await message.ack()
        for message in batch[25:]:
            await message.nak()
        await subscription.unsubscribe()
        await publish(js, day(20))  # published while no consumer ran

        async with consuming(js, statistics):
            expected = [("10:00", 50, 5, 0, 0, 0)]
            assert await counted_until(js, statistics, "acct-a", expected) == expected
        info = await js.consumer_info(EVENTS.name, CONSUMER)
        assert info.config.filter_subjects == list(COUNTED_SUBJECTS)
        assert (info.name, info.num_pending, info.num_ack_pending) == (CONSUMER, 0, 0)


def test_a_send_counts_its_recipients_less_the_suppressed_and_simulated_ones() -> None:
    send = email_event("acct-a", ev.EMAIL_EVENT_TYPE_SEND, START, recipients=4)
    assert counted(send) == ("delivery_attempts", 4)
    send.email.suppressed_recipients.append("R1@example.test")  # compared in any case
    send.email.simulated_recipients.append("r2@example.test")
    assert counted(send) == ("delivery_attempts", 2)
    send.email.suppressed_recipients.extend(["r0@example.test", "r3@example.test"])
    assert counted(send) is None  # nothing attempted
    no_destination = email_event("acct-a", ev.EMAIL_EVENT_TYPE_SEND, START, recipients=0)
    assert counted(no_destination) == ("delivery_attempts", 1)
