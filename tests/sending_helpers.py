"""Helpers for the sending tests: read what was queued and which events were published, over NATS."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import grpc
import nats
import pytest
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from postmesh.client import Client, error_details
from postmesh.common.natsserver import NatsServerProcess
from postmesh.common.outbound import load_mime
from postmesh.common.streams import EVENTS, OUTBOUND, outbound_subject
from postmesh.events.v1 import events_pb2
from postmesh.quota.v1 import quota_pb2
from postmesh.sender.v1 import queue_pb2


@contextmanager
def own_nats_server(directory: Path) -> Iterator[str]:
    """A nats-server of the test's own. The suite's shared one holds the delivery workers' durable
    consumer of the outbound work queue, and a work queue allows one consumer per subject: tests
    that read what was queued need a server where no delivery worker ever consumed."""
    server = NatsServerProcess(directory).start()
    try:
        yield server.url
    finally:
        server.stop()


def refusal(call: Callable[[], object]) -> tuple[grpc.StatusCode, str, str, dict[str, str]]:
    """(code, reason, message, metadata) of the error `call` raises; fails the test if it succeeds."""
    with pytest.raises(grpc.RpcError) as excinfo:
        call()
    details = error_details(excinfo.value)
    return details.code, details.reason, details.message, details.metadata


async def _queued(
    nats_url: str, account_id: str, wait_for: int, within: float
) -> list[queue_pb2.QueuedMessage]:
    connection = await nats.connect(nats_url)
    try:
        js = connection.jetstream()
        durable = f"test-{account_id}"
        await js.add_consumer(
            OUTBOUND.name,
            ConsumerConfig(
                durable_name=durable,
                filter_subject=outbound_subject(account_id),
                ack_policy=AckPolicy.EXPLICIT,
            ),
        )
        subscription = await js.pull_subscribe(outbound_subject(account_id), durable, stream=OUTBOUND.name)
        found: list[queue_pb2.QueuedMessage] = []
        deadline = time.monotonic() + within
        while time.monotonic() < deadline:
            try:
                batch = await subscription.fetch(100, timeout=0.5)
            except (TimeoutError, nats.errors.TimeoutError):
                if len(found) >= wait_for:
                    break
                continue
            for msg in batch:
                queued = queue_pb2.QueuedMessage.FromString(msg.data)
                queued.mime = await load_mime(js, queued)
                found.append(queued)
                await msg.ack()
        await js.delete_consumer(OUTBOUND.name, durable)
        return found
    finally:
        await connection.close()


def queued_messages(
    nats_url: str, account_id: str, *, wait_for: int = 0, timeout: float = 30.0
) -> list[queue_pb2.QueuedMessage]:
    """Takes the account's messages off the outbound work queue (the delivery workers' stream).

    Waits until at least `wait_for` are there (then a moment more, to see any extra), or `timeout`."""
    return asyncio.run(_queued(nats_url, account_id, wait_for, timeout))


async def _events(
    nats_url: str, account_id: str, wait_for: Callable[[list[events_pb2.Event]], bool], within: float
) -> list[events_pb2.Event]:
    connection = await nats.connect(nats_url)
    try:
        js = connection.jetstream()
        found: list[events_pb2.Event] = []
        deadline = time.monotonic() + within
        while True:
            subscription = await js.pull_subscribe(
                f"{EVENTS.subjects[0].removesuffix('>')}email.>",
                stream=EVENTS.name,
                config=ConsumerConfig(deliver_policy=DeliverPolicy.ALL, ack_policy=AckPolicy.NONE),
            )
            found = []
            while True:
                try:
                    batch = await subscription.fetch(500, timeout=0.5)
                except (TimeoutError, nats.errors.TimeoutError):
                    break
                for msg in batch:
                    event = events_pb2.Event.FromString(msg.data)
                    if event.account_id == account_id:
                        found.append(event)
            await subscription.unsubscribe()
            if wait_for(found) or time.monotonic() > deadline:
                return found
            await asyncio.sleep(0.2)
    finally:
        await connection.close()


def email_events(
    nats_url: str,
    account_id: str,
    *,
    until: Callable[[list[events_pb2.Event]], bool] = lambda events: True,
    timeout: float = 30.0,
) -> list[events_pb2.Event]:
    """The account's email events on the POSTMESH_EVENTS stream (waiting until `until` holds)."""
    return asyncio.run(_events(nats_url, account_id, until, timeout))


def of_type(events: list[events_pb2.Event], event_type: int) -> list[events_pb2.Event]:
    return [e for e in events if e.email.event_type == event_type]


def sent_last_24_hours(client: Client, expected: float, within: float = 15.0) -> float:
    """The account's sent count once it equals `expected` (or the last one seen after `within`).

    A sender replica may hold a short lease of quota while an account sends fast; what it did not use
    is given back when the lease ends, so the count settles within a second."""
    deadline = time.monotonic() + within
    while True:
        sent = client.quota.GetAccount(quota_pb2.GetAccountRequest()).send_quota.sent_last_24_hours
        if sent == expected or time.monotonic() > deadline:
            return sent
        time.sleep(0.1)
