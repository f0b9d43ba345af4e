"""Micro-benchmark of the quota service's statistics consumer: CPU and wall time per counted event.

    .venv/bin/python benchmarks/quota_statistics.py [--messages 5000] [--accounts 10] [--runs 3]

A private nats-server and a fresh SQLite database per run. The events stream is filled first with what
a day of sending publishes per message (Send, Delivery, often an Open; 2% Bounce, 0.1% Complaint, a
few Reject), then the consumer (and, where there is one, the reputation judge, with one last pass
after the stream is drained) runs until everything is acknowledged. CPU is this process's (the
event loop and aiosqlite's thread, not nats-server's), divided by the events that count.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import random
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import nats

import services.quota.settings  # noqa: F401 - registers the service's settings
from postmesh.common import db
from postmesh.common.bus import EventPublisher, ensure_streams, new_event
from postmesh.common.config import load_settings
from postmesh.common.natsserver import NatsServerProcess
from postmesh.common.service import SystemClock
from postmesh.common.streams import EVENTS, event_subject
from postmesh.events.v1 import events_pb2 as ev
from services.quota import statistics as quota_statistics
from services.quota.accounts import QuotaAccounts
from services.quota.models import Base
from services.quota.notify import Notifier
from services.quota.service import QuotaService


def day_of_events(accounts: list[str], messages: int, rng: random.Random) -> tuple[list[ev.Event], int]:
    """The events `messages` one-recipient messages publish, and how many of them count."""
    events: list[ev.Event] = []
    now = dt.datetime.now(dt.UTC)
    for i in range(messages):
        account = accounts[i % len(accounts)]
        mail = ev.Mail(message_id=f"m{i}", source="me@example.test", destination=[f"r{i}@example.test"])
        mail.timestamp.FromDatetime(now)

        def email(kind: int, account: str = account, mail: ev.Mail = mail, **payload: Any) -> ev.Event:
            return new_event(account, time=now, email=ev.EmailEvent(event_type=kind, mail=mail, **payload))

        events.append(email(ev.EMAIL_EVENT_TYPE_SEND))
        draw = rng.random()
        if draw < 0.02:
            bounced = ev.BouncedRecipient(email_address=mail.destination[0])
            bounce = ev.Bounce(bounce_type=ev.BOUNCE_TYPE_PERMANENT, bounced_recipients=[bounced])
            events.append(email(ev.EMAIL_EVENT_TYPE_BOUNCE, bounce=bounce))
            continue
        if draw < 0.025:
            events.append(email(ev.EMAIL_EVENT_TYPE_REJECT))
            continue
        events.append(email(ev.EMAIL_EVENT_TYPE_DELIVERY))
        if draw < 0.026:
            complained = ev.ComplainedRecipient(email_address=mail.destination[0])
            events.append(
                email(
                    ev.EMAIL_EVENT_TYPE_COMPLAINT, complaint=ev.Complaint(complained_recipients=[complained])
                )
            )
        if draw < 0.5:
            events.append(email(ev.EMAIL_EVENT_TYPE_OPEN))
    counted = sum(1 for e in events if quota_statistics.counted(e) is not None)
    return events, counted


async def one_run(workdir: Path, messages: int, accounts_count: int, seed: int) -> dict[str, float]:
    server = NatsServerProcess(workdir / "nats").start()
    engine = db.create_engine(f"sqlite+aiosqlite:///{workdir / 'quota.db'}")
    connection = await nats.connect(server.url)
    try:
        js = connection.jetstream()
        await ensure_streams(js)
        assert QuotaService.migrations_dir is not None
        await db.migrate(engine, QuotaService.migrations_dir, "alembic_version_quota", Base.metadata)
        sessions = db.session_factory(engine)
        clock = SystemClock()
        settings = load_settings({})
        publisher = EventPublisher(js)
        accounts = QuotaAccounts(sessions, clock, settings, Notifier(publisher, js, settings, clock))
        names = [f"acct{i}" for i in range(accounts_count)]
        for name in names:
            await accounts.state(name)  # the row a reservation made
        events, counted = day_of_events(names, messages, random.Random(seed))
        pending = [
            js.publish(event_subject(e), e.SerializeToString(), headers={"Nats-Msg-Id": e.event_id})
            for e in events
        ]
        for start in range(0, len(pending), 500):
            await asyncio.gather(*pending[start : start + 500])

        sendstats = quota_statistics.SendStatistics(sessions, clock, settings, accounts)
        consumer = quota_statistics.EventConsumer(js, sendstats)
        # None before the judge had a loop of its own (the consumer judged every batch).
        judge_class = getattr(quota_statistics, "ReputationJudge", None)
        judge = (
            None if judge_class is None else judge_class(sendstats, settings.reputation_evaluation_seconds)
        )
        wall, cpu = time.perf_counter(), time.process_time()
        tasks = [asyncio.create_task(consumer.run())]
        if judge is not None:
            tasks.append(asyncio.create_task(judge.run()))
        while True:
            await asyncio.sleep(0.05)
            with contextlib.suppress(Exception):  # the consumer may not be declared yet
                info = await js.consumer_info(EVENTS.name, quota_statistics.CONSUMER)
                if info.num_pending == 0 and info.num_ack_pending == 0:
                    break
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if judge is not None:
            await judge.run_once()  # what was counted last is judged too
        cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
        return {"events": len(events), "counted": counted, "cpu": cpu, "wall": wall}
    finally:
        await connection.close()
        await engine.dispose()
        server.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else "")
    parser.add_argument("--messages", type=int, default=5000, help="messages whose events are counted")
    parser.add_argument("--accounts", type=int, default=10, help="accounts they are spread over")
    parser.add_argument("--runs", type=int, default=3, help="runs, each on a fresh stream and database")
    args = parser.parse_args()
    results = []
    for run in range(args.runs):
        with tempfile.TemporaryDirectory(prefix="postmesh-statbench-") as tmp:
            result = asyncio.run(one_run(Path(tmp), args.messages, args.accounts, seed=run))
        results.append(result)
        print(
            f"run {run + 1}: {result['events']:.0f} events on the stream, {result['counted']:.0f} counted; "
            f"{result['cpu'] / result['counted'] * 1e6:.0f} µs CPU and "
            f"{result['wall'] / result['counted'] * 1e6:.0f} µs wall per counted event"
        )
    cpu = statistics.median(r["cpu"] / r["counted"] * 1e6 for r in results)
    wall = statistics.median(r["wall"] / r["counted"] * 1e6 for r in results)
    print(f"median: {cpu:.0f} µs CPU, {wall:.0f} µs wall per counted event")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
