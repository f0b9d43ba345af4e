"""Puller against a real nats-server: batches, a lone message on an idle consumer, statuses of old
requests, never more than asked for, redelivery after nak, a server restart mid-fetch, shutdown."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import nats
import pytest
from nats.aio.client import Client as NATS
from nats.errors import ConnectionClosedError, MsgAlreadyAckdError
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, StorageType, StreamConfig
from nats.js.errors import APIError

from postmesh.common.bus import fetch_batch
from postmesh.common.natsserver import NatsServerProcess
from postmesh.common.pull import Puller, ack_all

# Guards against a hang, not timing figures: every wait below is expected to end well before them.
GUARD = 10.0
LONG_WAIT = 30.0


@dataclass
class Consumer:
    nc: NATS
    js: JetStreamContext
    stream: str
    subject: str
    puller: Puller

    async def publish(self, count: int) -> list[bytes]:
        payloads = [f"m{i}".encode() for i in range(count)]
        for payload in payloads:
            await self.js.publish(self.subject, payload)
        return payloads


@contextlib.asynccontextmanager
async def consumer(url: str, *, max_ack_pending: int = -1, **connect: object) -> AsyncIterator[Consumer]:
    """A fresh stream with one durable pull consumer, and a Puller bound to it."""
    name = f"PULL_{uuid.uuid4().hex[:12]}"
    subject = f"pulltest.{name}"
    nc = await nats.connect(url, **connect)
    js = nc.jetstream()
    await js.add_stream(StreamConfig(name=name, subjects=[subject], storage=StorageType.FILE))
    await js.add_consumer(
        name,
        ConsumerConfig(
            durable_name="worker", ack_policy=AckPolicy.EXPLICIT, ack_wait=30, max_ack_pending=max_ack_pending
        ),
    )
    puller = await Puller.bind(js, stream=name, durable="worker")
    try:
        yield Consumer(nc, js, name, subject, puller)
    finally:
        with contextlib.suppress(Exception):
            await puller.unsubscribe()
        with contextlib.suppress(Exception):
            await js.delete_stream(name)
        await nc.close()


async def test_a_partial_batch_comes_back_without_waiting_out_the_timeout(nats_url: str) -> None:
    async with consumer(nats_url) as c:
        sent = await c.publish(3)
        got = await asyncio.wait_for(c.puller.fetch(10, timeout=LONG_WAIT), GUARD)
        assert [m.data for m in got] == sent
        for message in got:
            await message.ack()


async def test_a_lone_message_on_an_idle_consumer_comes_back_as_it_arrives(nats_url: str) -> None:
    """nats-py's fetch, once the first message of its lingering request has come, waits for the
    rest of the batch until the request expires: here 30 s for one SendEmail."""
    async with consumer(nats_url) as c:
        fetching = asyncio.create_task(c.puller.fetch(64, timeout=LONG_WAIT))
        await asyncio.sleep(0.3)  # the fetch is waiting on the server by now
        assert not fetching.done()
        await c.publish(1)
        got = await asyncio.wait_for(fetching, GUARD)
        assert [m.data for m in got] == [b"m0"]
        # And the next one too, the consumer idle again.
        fetching = asyncio.create_task(c.puller.fetch(64, timeout=LONG_WAIT))
        await asyncio.sleep(0.3)
        await c.js.publish(c.subject, b"again")
        assert [m.data for m in await asyncio.wait_for(fetching, GUARD)] == [b"again"]


async def test_an_idle_fetch_returns_nothing_after_its_timeout(nats_url: str) -> None:
    async with consumer(nats_url) as c:
        assert await asyncio.wait_for(c.puller.fetch(5, timeout=0.3), GUARD) == []
        assert await asyncio.wait_for(fetch_batch(c.puller, 5, wait_seconds=0.3), GUARD) == []


async def test_a_worker_refused_behind_others_gets_the_next_message_as_it_arrives(nats_url: str) -> None:
    """With the consumer's unacked messages at max_ack_pending, a new request is refused at once
    ("408 Requests Pending") while another worker's request waits for more than there is. nats-py
    then sends a lingering request for the whole batch and waits for all of it until it expires:
    its message would wait out the 30 s."""
    async with consumer(nats_url, max_ack_pending=1) as c:
        await c.publish(1)
        (held,) = await asyncio.wait_for(c.puller.fetch(1, timeout=LONG_WAIT), GUARD)
        first = await Puller.bind(c.js, stream=c.stream, durable="worker")
        second = await Puller.bind(c.js, stream=c.stream, durable="worker")
        try:
            firsts = asyncio.create_task(first.fetch(64, timeout=2.0))
            await asyncio.sleep(0.3)
            await c.js.publish(c.subject, b"behind")  # waits for an ack
            # The server refuses the next request once it counts the message as pending (else that
            # request, too, waits for more than there is, and holds what it gets until it expires).
            for _ in range(200):
                if (await c.js.consumer_info(c.stream, "worker")).num_pending >= 1:
                    break
                await asyncio.sleep(0.05)
            seconds = asyncio.create_task(second.fetch(64, timeout=LONG_WAIT))
            await asyncio.sleep(0.3)
            await held.ack()
            (behind,) = await asyncio.wait_for(firsts, GUARD)
            assert behind.data == b"behind"
            await c.js.publish(c.subject, b"next")
            await behind.ack()
            assert [m.data for m in await asyncio.wait_for(seconds, GUARD)] == [b"next"]
        finally:
            await first.unsubscribe()
            await second.unsubscribe()


async def test_never_more_than_asked_for(nats_url: str) -> None:
    async with consumer(nats_url) as c:
        sent = await c.publish(20)
        got: list[bytes] = []
        wants = itertools.cycle((7, 1, 5))
        while len(got) < len(sent):
            want = next(wants)
            batch = await asyncio.wait_for(c.puller.fetch(want, timeout=LONG_WAIT), GUARD)
            assert 1 <= len(batch) <= want
            got += [m.data for m in batch]
            for message in batch:
                await message.ack()
        assert got == sent


async def test_a_request_given_up_on_does_not_disturb_the_next_fetches(nats_url: str) -> None:
    async with consumer(nats_url) as c:
        # A fetch cancelled while its request waits on the server: the request lives on there for a
        # second, and its 408 arrives while the next fetch waits.
        abandoned = asyncio.create_task(c.puller.fetch(10, timeout=1.0))
        await asyncio.sleep(0.3)
        abandoned.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await abandoned
        assert abandoned.cancelled()  # a cancellation stays one (no TimeoutError in its place)
        fetching = asyncio.create_task(c.puller.fetch(10, timeout=LONG_WAIT))
        await asyncio.sleep(1.5)  # the old request's 408 has come by now; the fetch waits on
        assert not fetching.done()
        sent = await c.publish(2)
        got = [m.data for m in await asyncio.wait_for(fetching, GUARD)]
        while len(got) < len(sent):
            got += [m.data for m in await asyncio.wait_for(c.puller.fetch(10, timeout=LONG_WAIT), GUARD)]
        assert got == sent


async def test_a_message_taken_by_a_request_given_up_on_is_still_handed_out_one_at_a_time(
    nats_url: str,
) -> None:
    async with consumer(nats_url) as c:
        abandoned = asyncio.create_task(c.puller.fetch(10, timeout=LONG_WAIT))
        await asyncio.sleep(0.3)
        abandoned.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await abandoned
        sent = await c.publish(3)  # the first goes to the old request, still waiting on the server
        got: list[bytes] = []
        while len(got) < len(sent):
            batch = await asyncio.wait_for(c.puller.fetch(1, timeout=LONG_WAIT), GUARD)
            assert len(batch) == 1
            got += [m.data for m in batch]
        assert got == sent


async def test_a_naked_message_comes_again_and_acks_work(nats_url: str) -> None:
    async with consumer(nats_url) as c:
        await c.publish(1)
        (first,) = await asyncio.wait_for(c.puller.fetch(5, timeout=LONG_WAIT), GUARD)
        assert first.metadata.num_delivered == 1
        await first.in_progress()
        await first.nak(delay=0.2)
        (again,) = await asyncio.wait_for(c.puller.fetch(5, timeout=LONG_WAIT), GUARD)
        assert again.data == first.data and again.metadata.num_delivered == 2
        await again.ack_sync()
        assert await asyncio.wait_for(c.puller.fetch(5, timeout=0.5), GUARD) == []


async def test_ack_all_acks_a_batch_as_each_ack_would(nats_url: str) -> None:
    async with consumer(nats_url) as c:
        sent = await c.publish(20)
        got = await asyncio.wait_for(c.puller.fetch(20, timeout=LONG_WAIT), GUARD)
        assert [m.data for m in got] == sent
        await ack_all(got[:15])
        await ack_all([])
        with pytest.raises(MsgAlreadyAckdError):
            await got[0].ack()
        await c.nc.flush()
        info = await c.js.consumer_info(c.stream, "worker")
        assert (info.num_ack_pending, info.ack_floor.stream_seq) == (5, 15)
        # Acked: not handed out again, even after the others were naked.
        for message in got[15:]:
            await message.nak()
        again = await asyncio.wait_for(c.puller.fetch(20, timeout=LONG_WAIT), GUARD)
        assert [m.data for m in again] == sent[15:]
        await ack_all(again)
        await c.nc.flush()
        info = await c.js.consumer_info(c.stream, "worker")
        assert (info.num_ack_pending, info.num_pending, info.ack_floor.stream_seq) == (0, 0, 20)


async def test_ack_all_without_a_connection_fails_as_ack_does(nats_url: str) -> None:
    async with consumer(nats_url) as c:
        await c.publish(2)
        got = await asyncio.wait_for(c.puller.fetch(2, timeout=LONG_WAIT), GUARD)
        await c.nc.close()
        with pytest.raises(ConnectionClosedError):
            await ack_all(got)


async def test_a_missing_consumer_is_an_error_not_a_busy_loop(nats_url: str) -> None:
    async with consumer(nats_url) as c:
        missing = await Puller.bind(c.js, stream=c.stream, durable="nobody")
        try:
            with pytest.raises(APIError):
                await asyncio.wait_for(missing.fetch(5, timeout=LONG_WAIT), GUARD)
        finally:
            await missing.unsubscribe()


async def test_unsubscribed_puller_lets_drain_finish(nats_url: str) -> None:
    async with consumer(nats_url) as c:
        fetching = asyncio.create_task(c.puller.fetch(5, timeout=LONG_WAIT))
        await asyncio.sleep(0.2)
        fetching.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await fetching
        await c.puller.unsubscribe()
        await asyncio.wait_for(c.nc.drain(), GUARD)


async def test_a_server_restart_mid_fetch_does_not_hang_the_consumer(tmp_path: Path) -> None:
    server = NatsServerProcess(tmp_path / "nats").start()
    try:
        async with consumer(
            server.url, reconnect_time_wait=0.2, max_reconnect_attempts=-1, connect_timeout=1
        ) as c:
            fetching = asyncio.create_task(fetch_batch(c.puller, 10, wait_seconds=2.0))
            await asyncio.sleep(0.3)  # a lingering request waits on the server
            server.stop()
            assert await asyncio.wait_for(fetching, GUARD) == []
            server.start()

            async def first_batch() -> list[bytes]:
                while True:
                    batch = await fetch_batch(c.puller, 10, wait_seconds=2.0)
                    if batch:
                        for message in batch:
                            await message.ack()
                        return [m.data for m in batch]

            waiting = asyncio.create_task(first_batch())
            # The stream survived on file; the message is published once the client is back.
            for _ in range(100):
                if c.nc.is_connected:
                    break
                await asyncio.sleep(0.1)
            for _ in range(100):  # JetStream answers a moment after the server listens
                with contextlib.suppress(nats.errors.NoRespondersError, nats.errors.TimeoutError):
                    await c.js.publish(c.subject, b"after")
                    break
                await asyncio.sleep(0.1)
            assert await asyncio.wait_for(waiting, 3 * GUARD) == [b"after"]
    finally:
        server.stop()
