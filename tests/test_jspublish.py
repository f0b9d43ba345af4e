"""postmesh.common.jspublish answers as nats-py's js.publish and msg.ack_sync do, on a real nats-server:
the same PubAck (duplicates flagged), the same errors (no stream, stream full, no reply in time), and
its one reply subscription per connection survives a nats-server restart; a connection closed under
a waiting publish fails it at once."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import nats
import nats.errors
import nats.js.errors
import pytest
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import DiscardPolicy, PubAck, RetentionPolicy, StreamConfig

from postmesh.common import jspublish
from postmesh.common.natsserver import NatsServerProcess


@pytest.fixture
async def connection(nats_url: str) -> AsyncIterator[NATS]:
    nc = await nats.connect(nats_url)
    yield nc
    await nc.close()


async def _stream(js: JetStreamContext, **config: object) -> str:
    """A fresh stream on its own subjects; returns its subject prefix."""
    name = f"T{uuid.uuid4().hex[:12]}"
    await js.add_stream(StreamConfig(name=name, subjects=[f"{name}.>"], **config))  # type: ignore[arg-type]
    return name


async def _error_of(call: Awaitable[object]) -> BaseException:
    with pytest.raises(Exception) as caught:
        await call
    return caught.value


async def test_a_publish_is_acked_as_nats_py_acks_it_and_duplicates_are_flagged(connection: NATS) -> None:
    js = connection.jetstream()
    prefix = await _stream(js)
    first = await jspublish.publish(js, f"{prefix}.a", b"one", headers={"Nats-Msg-Id": "m1"})
    again = await jspublish.publish(js, f"{prefix}.a", b"one", headers={"Nats-Msg-Id": "m1"})
    theirs = await js.publish(f"{prefix}.a", b"two", headers={"Nats-Msg-Id": "m2"})
    theirs_again = await js.publish(f"{prefix}.a", b"two", headers={"Nats-Msg-Id": "m2"})

    assert isinstance(first, PubAck)
    assert (first.stream, first.seq, first.duplicate) == (prefix, 1, None)
    assert (again.stream, again.seq, again.duplicate) == (prefix, 1, True)
    assert (theirs.seq, theirs_again.seq, theirs_again.duplicate) == (2, 2, True)
    assert (await js.stream_info(prefix)).state.messages == 2
    stored = await js.get_msg(prefix, 1)
    assert stored.data == b"one" and (stored.headers or {}).get("Nats-Msg-Id") == "m1"


async def test_concurrent_publishes_each_get_their_own_ack(connection: NATS) -> None:
    js = connection.jetstream()
    prefix = await _stream(js)
    acks = await asyncio.gather(
        *(jspublish.publish(js, f"{prefix}.{i}", str(i).encode()) for i in range(200))
    )
    assert sorted(ack.seq for ack in acks) == list(range(1, 201))
    # Each ack belongs to its own publish: the stored message at that sequence has that publish's payload.
    for i, ack in enumerate(acks):
        assert (await js.get_msg(prefix, ack.seq)).data == str(i).encode()


async def test_no_stream_and_a_full_stream_fail_as_with_nats_py(connection: NATS) -> None:
    js = connection.jetstream()
    nowhere = f"nostream.{uuid.uuid4().hex}"
    mine = await _error_of(jspublish.publish(js, nowhere, b"x"))
    theirs = await _error_of(js.publish(nowhere, b"x"))
    assert type(mine) is type(theirs) is nats.js.errors.NoStreamResponseError

    prefix = await _stream(js, max_msgs=1, discard=DiscardPolicy.NEW)
    await jspublish.publish(js, f"{prefix}.a", b"fits")
    mine = await _error_of(jspublish.publish(js, f"{prefix}.a", b"too many"))
    theirs = await _error_of(js.publish(f"{prefix}.a", b"too many"))
    assert isinstance(mine, nats.js.errors.APIError) and isinstance(theirs, nats.js.errors.APIError)
    assert type(mine) is type(theirs)
    assert (mine.code, mine.err_code, mine.description) == (theirs.code, theirs.err_code, theirs.description)


async def test_publish_many_answers_each_message_as_its_publish_would(connection: NATS) -> None:
    js = connection.jetstream()
    prefix = await _stream(js)
    full = await _stream(js, max_msgs=1, discard=DiscardPolicy.NEW)
    await jspublish.publish(js, f"{full}.a", b"fits")
    nowhere = f"nostream.{uuid.uuid4().hex}"
    silent = f"silent.{uuid.uuid4().hex}"
    heard: list[Msg] = []

    async def hear(msg: Msg) -> None:
        heard.append(msg)

    await connection.subscribe(silent, cb=hear)  # heard, never answered
    messages: list[tuple[str, bytes, dict[str, str] | None]] = [
        (f"{prefix}.{i}", str(i).encode(), {"Nats-Msg-Id": f"m{i}"}) for i in range(50)
    ]
    messages += [
        (f"{prefix}.again", b"0", {"Nats-Msg-Id": "m0"}),
        (nowhere, b"x", None),
        (f"{full}.a", b"too many", None),
        (silent, b"x", None),
    ]
    results = await jspublish.publish_many(js, messages, wait_seconds=0.5)

    assert len(results) == len(messages)
    acks = results[:50]
    # Written in order: the stream holds them in the batch's order.
    assert [(a.stream, a.seq, a.duplicate) for a in acks] == [(prefix, i + 1, None) for i in range(50)]  # type: ignore[union-attr]
    for i in (0, 49):
        assert (await js.get_msg(prefix, i + 1)).data == str(i).encode()
    duplicate, no_stream, refused, unanswered = results[50:]
    assert isinstance(duplicate, PubAck) and (duplicate.seq, duplicate.duplicate) == (1, True)
    assert type(no_stream) is nats.js.errors.NoStreamResponseError
    theirs = await _error_of(js.publish(f"{full}.a", b"too many"))
    assert isinstance(refused, nats.js.errors.APIError) and type(refused) is type(theirs)
    assert (refused.err_code, refused.description) == (theirs.err_code, theirs.description)
    assert type(unanswered) is nats.errors.TimeoutError and len(heard) == 1
    assert await jspublish.publish_many(js, []) == []


async def test_publish_all_stores_every_message_or_raises_the_first_failure(connection: NATS) -> None:
    js = connection.jetstream()
    prefix = await _stream(js)
    good: list[tuple[str, bytes, dict[str, str] | None]] = [
        (f"{prefix}.{i}", str(i).encode(), {"Nats-Msg-Id": f"m{i}"}) for i in range(20)
    ]
    await jspublish.publish_all(js, good)
    await jspublish.publish_all(js, good[:5])  # duplicates: stored already, no failure
    assert (await js.stream_info(prefix)).state.messages == 20
    assert (await js.get_msg(prefix, 20)).data == b"19"
    # What publish_all reads a stored message's reply by, without parsing it.
    reply = await jspublish.request(connection, f"{prefix}.x", b"x", wait_seconds=5)
    assert reply.data.startswith(b'{"stream":') and b'"error"' not in reply.data

    full = await _stream(js, max_msgs=1, discard=DiscardPolicy.NEW)
    await jspublish.publish(js, f"{full}.a", b"fits")
    nowhere = f"nostream.{uuid.uuid4().hex}"
    refused = await _error_of(jspublish.publish_all(js, [good[0], (f"{full}.a", b"too many", None)]))
    theirs = await _error_of(js.publish(f"{full}.a", b"too many"))
    assert isinstance(refused, nats.js.errors.APIError) and type(refused) is type(theirs)
    assert (refused.err_code, refused.description) == (theirs.err_code, theirs.description)
    # The first failure in the batch's order.
    both: list[tuple[str, bytes, dict[str, str] | None]] = [(nowhere, b"x", None), (f"{full}.a", b"no", None)]
    first = await _error_of(jspublish.publish_all(js, both))
    assert type(first) is nats.js.errors.NoStreamResponseError


async def test_no_reply_in_time_is_a_nats_timeout_and_a_late_reply_is_ignored(connection: NATS) -> None:
    js = connection.jetstream()
    heard: asyncio.Queue[Msg] = asyncio.Queue()

    async def hear(msg: Msg) -> None:
        heard.put_nowait(msg)

    # A plain subscriber on a subject no stream takes: the publish is heard, and answered only by hand.
    silent = f"silent.{uuid.uuid4().hex}"
    await connection.subscribe(silent, cb=hear)
    error = await _error_of(jspublish.publish(js, silent, b"x", wait_seconds=0.2))
    assert type(error) is nats.errors.TimeoutError
    first = await heard.get()

    # The first answer comes late, while a second publish waits: it goes nowhere; the second gets its own.
    second = asyncio.create_task(jspublish.publish(js, silent, b"y", wait_seconds=10))
    waiting = await heard.get()
    await connection.publish(first.reply, b'{"stream":"LATE","seq":1}')
    await connection.publish(waiting.reply, b'{"stream":"ON_TIME","seq":2}')
    ack = await second
    assert (ack.stream, ack.seq) == ("ON_TIME", 2)


async def test_the_reply_subscription_survives_a_nats_server_restart(tmp_path: Path) -> None:
    server = NatsServerProcess(tmp_path / "nats").start()
    reconnected = asyncio.Event()
    disconnected = asyncio.Event()

    async def on_reconnect() -> None:
        reconnected.set()

    async def on_disconnect() -> None:
        disconnected.set()

    try:
        nc = await nats.connect(
            server.url,
            reconnected_cb=on_reconnect,
            disconnected_cb=on_disconnect,
            max_reconnect_attempts=-1,
            reconnect_time_wait=0.2,
        )
        js = nc.jetstream()
        prefix = await _stream(js)
        assert (await jspublish.publish(js, f"{prefix}.a", b"before")).seq == 1

        server.stop()
        await asyncio.wait_for(disconnected.wait(), 10)
        # Nothing answers while the server is down: a timeout (the outcome is unknown), not a hang.
        during = jspublish.publish(js, f"{prefix}.a", b"during", wait_seconds=0.3)
        error = await _error_of(asyncio.wait_for(during, 10))
        assert type(error) is nats.errors.TimeoutError

        server.start()
        await asyncio.wait_for(reconnected.wait(), 20)
        after = await jspublish.publish(js, f"{prefix}.a", b"after", headers={"Nats-Msg-Id": "after"})
        assert after.stream == prefix and not after.duplicate
        assert (await js.get_msg(prefix, after.seq)).data == b"after"
        await nc.close()
    finally:
        server.stop()


async def test_closing_the_connection_fails_a_waiting_publish_at_once(nats_url: str) -> None:
    nc = await nats.connect(nats_url)
    js = nc.jetstream()
    heard = asyncio.Event()

    async def never_answer(msg: Msg) -> None:
        heard.set()

    silent = f"silent.{uuid.uuid4().hex}"
    await nc.subscribe(silent, cb=never_answer)
    waiting = asyncio.create_task(jspublish.publish(js, silent, b"x", wait_seconds=120))
    await heard.wait()
    await nc.close()
    # Long before its 120 s: the close, not a timeout, ends it.
    done, _ = await asyncio.wait([waiting], timeout=30)
    assert done, "a publish waiting on a closed connection hung"
    assert type(waiting.exception()) is nats.errors.ConnectionClosedError
    error = await _error_of(jspublish.publish(js, silent, b"x"))
    assert type(error) is nats.errors.ConnectionClosedError


Ack = Callable[[Msg], Awaitable[object]]


async def _lean_ack(msg: Msg) -> object:
    return await jspublish.ack_sync(msg, wait_seconds=5.0)


async def _nats_py_ack(msg: Msg) -> object:
    return await msg.ack_sync(timeout=5.0)


@pytest.mark.parametrize("ack", [_lean_ack, _nats_py_ack], ids=["jspublish", "nats-py"])
async def test_ack_sync_removes_the_message_and_refuses_a_second_ack(connection: NATS, ack: Ack) -> None:
    js = connection.jetstream()
    prefix = await _stream(js, retention=RetentionPolicy.WORK_QUEUE)
    for i in range(3):
        await js.publish(f"{prefix}.a", str(i).encode())
    subscription = await js.pull_subscribe(f"{prefix}.a", durable="worker", stream=prefix)
    messages = await subscription.fetch(3, timeout=5)
    for msg in messages:
        await ack(msg)
    # Confirmed acks: the work queue has let them go by the time ack_sync returns.
    assert (await js.stream_info(prefix)).state.messages == 0
    with pytest.raises(nats.errors.MsgAlreadyAckdError):
        await ack(messages[0])

    # The consumer gone, nothing answers the ack: as nats-py, NoRespondersError.
    await js.publish(f"{prefix}.a", b"last")
    (last,) = await subscription.fetch(1, timeout=5)
    await js.delete_consumer(prefix, "worker")
    with pytest.raises(nats.errors.NoRespondersError):
        await ack(last)
