"""The NATS JetStream connection: connect with backoff, declare streams idempotently, publish events."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime as dt
import functools
import logging
import uuid
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import Any

import grpc
import nats
import nats.js.errors
from google.protobuf.message import DecodeError
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, ConsumerInfo, DeliverPolicy
from nats.js.errors import APIError, BadRequestError, NotFoundError

from postmesh.common import db, jspublish, protoutil, tracing
from postmesh.common.pull import Puller, ack_all
from postmesh.common.streams import ALL_STREAMS, EVENTS, StreamSpec, event_subject
from postmesh.events.v1 import events_pb2

log = logging.getLogger(__name__)


async def connect_nats(
    url: str,
    *,
    max_delay: float,
    name: str = "postmesh",
    disconnected_cb: Callable[[], Awaitable[None]] | None = None,
    reconnected_cb: Callable[[], Awaitable[None]] | None = None,
) -> NATS:
    """Connects, retrying with exponential backoff until the server answers. The callbacks hear when
    the connection is lost and when it is back (the client reconnects by itself)."""
    delay = 0.2
    callbacks: dict[str, Any] = {}
    if disconnected_cb is not None:
        callbacks["disconnected_cb"] = disconnected_cb
    if reconnected_cb is not None:
        callbacks["reconnected_cb"] = reconnected_cb
    while True:
        try:
            return await nats.connect(
                url,
                name=name,
                **callbacks,
                connect_timeout=2,
                allow_reconnect=True,
                max_reconnect_attempts=-1,
                reconnect_time_wait=1,
            )
        except Exception as exc:  # nats-py raises several unrelated types for "not reachable"
            log.warning(
                "NATS not reachable, retrying", extra={"url": url, "error": repr(exc), "retry_in": delay}
            )
            await asyncio.sleep(delay)
            delay = min(delay * 2, max_delay)


async def ensure_streams(
    js: JetStreamContext,
    specs: Iterable[StreamSpec] = ALL_STREAMS,
    *,
    replicas: int = 1,
    duplicate_window_seconds: float | None = None,
) -> None:
    """Creates each stream, or updates it to the declared configuration; safe to run on every start."""
    for spec in specs:
        if duplicate_window_seconds is not None:
            spec = dataclasses.replace(spec, duplicate_window_seconds=duplicate_window_seconds)
        config = spec.config(replicas)
        try:
            await js.add_stream(config)
        except BadRequestError as exc:
            # 10058: a stream of that name exists with another configuration: bring it up to date.
            if exc.err_code != 10058:
                raise
            await js.update_stream(config)


def new_event(
    account_id: str, *, time: dt.datetime | None = None, event_id: str = "", **payload: object
) -> events_pb2.Event:
    """An Event stamped now (or at `time`), under `event_id` or a fresh random one; pass exactly one
    payload (email=..., account_changed=...)."""
    event = events_pb2.Event(event_id=event_id or uuid.uuid4().hex, account_id=account_id, **payload)  # type: ignore[arg-type]
    protoutil.set_timestamp(event.time, time or dt.datetime.now(dt.UTC))
    return event


class EventPublisher:
    """Publishes protobuf events on JetStream, de-duplicated by event id."""

    def __init__(self, js: JetStreamContext) -> None:
        self._js = js

    async def publish(self, event: events_pb2.Event) -> None:
        connection = getattr(self._js, "_nc", None)
        if connection is not None and not connection.is_connected:
            # Known to be out: fail now rather than wait for the publish to time out.
            raise nats.errors.ConnectionClosedError
        headers = {"Nats-Msg-Id": event.event_id}
        tracing.inject(headers)
        await jspublish.publish(self._js, event_subject(event), event.SerializeToString(), headers=headers)


EventHandler = Callable[[events_pb2.Event], Awaitable[None]]


async def fetch_batch(subscription: Puller, batch: int, wait_seconds: float) -> list[Msg]:
    """Up to `batch` messages from a pull consumer; none when `wait_seconds` pass first.

    On Python 3.11, asyncio.wait_for (inside nats-py's fetch, which Puller does not use) can turn a
    cancellation that arrives as the timeout fires into a TimeoutError; a loop that retries on
    timeouts would then never stop. A task that is being cancelled is therefore cancelled here,
    whatever fetch raised.
    """
    try:
        return await subscription.fetch(batch, timeout=wait_seconds)
    except (nats.errors.TimeoutError, TimeoutError):
        task = asyncio.current_task()
        if task is not None and task.cancelling():
            raise asyncio.CancelledError from None
        return []


async def pull_forever(
    js: JetStreamContext,
    stream: str,
    config: ConsumerConfig,
    process: Callable[[list[Msg]], Awaitable[None]],
    *,
    batch: int,
    wait_seconds: float = 5.0,
) -> None:
    """Declares the durable pull consumer `config` on `stream` (replicas share it, so each message
    goes to one of them) and hands every fetched batch to `process`, which acks, naks or terms."""
    assert config.durable_name, "a durable consumer"
    await js.add_consumer(stream, config)
    subscription = await Puller.bind(js, stream=stream, durable=config.durable_name)
    try:
        while True:
            messages = await fetch_batch(subscription, batch, wait_seconds)
            if messages:
                await process(messages)
    finally:
        # A subscription left behind would keep drain() waiting at shutdown.
        with contextlib.suppress(Exception):
            await subscription.unsubscribe()


def _per_event_config(durable: str, subjects: Sequence[str], max_deliver: int) -> ConsumerConfig:
    """The durable of a consumer that retries event by event (consume_events and
    consume_events_batched declare the same, so a consumer can move between them in place)."""
    return ConsumerConfig(
        durable_name=durable,
        filter_subjects=list(subjects),
        ack_policy=AckPolicy.EXPLICIT,
        deliver_policy=DeliverPolicy.ALL,
        max_deliver=max_deliver,
        ack_wait=60,
    )


async def _decoded(messages: list[Msg]) -> list[tuple[Msg, events_pb2.Event]]:
    """The messages that hold an Event, with it; the others are dropped (no redelivery would help)."""
    decoded = []
    for message in messages:
        try:
            decoded.append((message, events_pb2.Event.FromString(message.data)))
        except DecodeError:
            log.error("undecodable event dropped", extra={"subject": message.subject})
            await message.term()
    return decoded


_GRPC_OUTAGE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
# What NATS raises while it cannot be reached or answer; not what an event can cause (a payload too
# large, a bad subject), which must count as a try or one event would hold its consumer forever.
_NATS_OUTAGE = (
    nats.errors.TimeoutError,
    nats.errors.ConnectionClosedError,
    nats.errors.ConnectionDrainingError,
    nats.errors.ConnectionReconnectingError,
    nats.errors.NoRespondersError,
    nats.errors.NoServersError,
    nats.errors.OutboundBufferLimitError,
    nats.errors.StaleConnectionError,
    nats.errors.UnexpectedEOF,
    nats.js.errors.NoStreamResponseError,
    nats.js.errors.ServiceUnavailableError,
)


def _dependency_out(exc: BaseException) -> bool:
    """Whether `exc` says a dependency (the database, NATS, another service) cannot answer now: no
    fault of the event being handled."""
    if isinstance(exc, grpc.aio.AioRpcError):
        return exc.code() in _GRPC_OUTAGE
    return isinstance(exc, _NATS_OUTAGE) or db.unreachable(exc)


async def _outlasting_outages(
    step: Callable[[], Awaitable[None]],
    messages: Sequence[Msg],
    *,
    durable: str,
    retry_delay: float,
    failed: Exception | None = None,
) -> None:
    """Runs `step`, again every `retry_delay` seconds for as long as it fails because a dependency is
    out, keeping `messages` from being sent to another worker meanwhile. Such a failure is not counted
    as a try: max_deliver would otherwise drop every event that arrived during a long outage. Any other
    failure is raised at once. `failed`: the failure of a first run the caller made itself."""
    while True:
        if failed is None:
            try:
                await step()
                return
            except Exception as exc:
                failed = exc
        if not _dependency_out(failed):
            raise failed
        log.warning(
            "a dependency is out; the events wait for it",
            exc_info=failed,
            extra={"consumer": durable, "events": len(messages)},
        )
        failed = None
        for message in messages:
            with contextlib.suppress(Exception):  # NATS itself out: redelivered after ack_wait instead
                await message.in_progress()
        await asyncio.sleep(retry_delay)


async def _failed(
    message: Msg, event: events_pb2.Event, *, durable: str, max_deliver: int, retry_delay: float
) -> None:
    """After a handler error: the event again after `retry_delay`, or, on its `max_deliver`th try,
    logged and dropped (one bad event must not stop the stream). Call from an except block."""
    deliveries = message.metadata.num_delivered if message.metadata else 0
    log.exception(
        "event handler failed",
        extra={"consumer": durable, "event_id": event.event_id, "delivery": deliveries},
    )
    if deliveries >= max_deliver:
        await message.term()
    else:
        await message.nak(delay=retry_delay)


async def consume_events(
    js: JetStreamContext,
    *,
    durable: str,
    subjects: Sequence[str],
    handle: EventHandler,
    batch: int = 64,
    max_deliver: int = 10,
    retry_delay: float = 5.0,
) -> None:
    """Feeds every event on `subjects` to `handle`, one at a time, at least once.

    A handler error redelivers the event after `retry_delay`; after `max_deliver` tries it is logged
    and dropped, so one bad event cannot stop the stream. Handlers must be idempotent (event_id is
    unique).
    """

    async def process(messages: list[Msg]) -> None:
        for message, event in await _decoded(messages):
            try:
                await _outlasting_outages(
                    functools.partial(handle, event), [message], durable=durable, retry_delay=retry_delay
                )
            except Exception:
                await _failed(
                    message, event, durable=durable, max_deliver=max_deliver, retry_delay=retry_delay
                )
                continue
            await message.ack()

    config = _per_event_config(durable, subjects, max_deliver)
    await pull_forever(js, EVENTS.name, config, process, batch=batch)


EventBatchHandler = Callable[[list[events_pb2.Event]], Awaitable[None]]


async def consume_event_batches(
    js: JetStreamContext,
    *,
    durable: str,
    subjects: Sequence[str],
    handle: EventBatchHandler,
    batch: int = 256,
) -> None:
    """Feeds the events on `subjects` to `handle` a whole fetched batch at a time (one transaction
    for many events), at least once: the batch is acked after `handle` returns, and redelivered a
    second later if it raises. Handlers must be idempotent by event id. Undecodable messages are
    dropped."""

    async def process(messages: list[Msg]) -> None:
        events, parsed = [], []
        for message in messages:
            try:
                events.append(events_pb2.Event.FromString(message.data))
            except DecodeError:
                log.warning("not an Event; dropped", extra={"subject": message.subject})
                await message.term()
                continue
            parsed.append(message)
        try:
            await handle(events)
        except Exception:
            for message in parsed:
                await message.nak(delay=1)
            raise
        await ack_all(parsed)

    config = ConsumerConfig(
        durable_name=durable,
        filter_subjects=list(subjects),
        ack_policy=AckPolicy.EXPLICIT,
        deliver_policy=DeliverPolicy.ALL,
        ack_wait=30,
        max_ack_pending=4096,
    )
    await pull_forever(js, EVENTS.name, config, process, batch=batch, wait_seconds=1)


async def _consumer_info(js: JetStreamContext, durable: str) -> ConsumerInfo | None:
    try:
        return await js.consumer_info(EVENTS.name, durable)
    except NotFoundError:
        return None


async def _retire(js: JetStreamContext, old: ConsumerInfo, idle_seconds: float) -> None:
    """Has the server delete the durable `old` once nobody has read it for `idle_seconds` (its
    inactive threshold, updated in place). Not deleted at once: a replica of the earlier release still
    reading it (a rolling upgrade) would see it gone, restart its loop and declare it again from the
    start of the stream, routing every kept event again (webhooks posted twice: an outbox row is
    deleted once delivered)."""
    if old.config.inactive_threshold == idle_seconds:
        return
    # Without the metadata the server adds itself (_nats.*), which it may refuse to be sent.
    metadata = {k: v for k, v in (old.config.metadata or {}).items() if not k.startswith("_nats.")}
    config = dataclasses.replace(old.config, inactive_threshold=idle_seconds, metadata=metadata or None)
    with contextlib.suppress(NotFoundError):
        await js.add_consumer(EVENTS.name, config)


async def _taking_over(
    js: JetStreamContext, config: ConsumerConfig, replaces: Sequence[str], idle_seconds: float
) -> ConsumerConfig:
    """`config`, for a durable that takes over from the durables `replaces` (an earlier release's) on
    the events stream: what pull_forever is to declare.

    Created, the durable starts right after the lowest ack floor of the replaced durables that exist
    (the whole stream when none does), so nothing any of them had yet to handle is missed; the events
    between their floors are handled again, which is harmless because the handlers are idempotent by
    event id. An existing durable keeps where it started (a deliver policy cannot be updated). On
    every start, the replaced durables left are retired (see _retire)."""
    old = [info for name in replaces if (info := await _consumer_info(js, name)) is not None]
    existing = await _consumer_info(js, str(config.durable_name))
    if existing is None:
        if old:
            config = dataclasses.replace(
                config,
                deliver_policy=DeliverPolicy.BY_START_SEQUENCE,
                opt_start_seq=min(info.ack_floor.stream_seq if info.ack_floor else 0 for info in old) + 1,
            )
        try:
            await js.add_consumer(EVENTS.name, config)
        except APIError:
            # Another process (a worker, a replica) created it first, maybe from other floors: bind to it.
            existing = await _consumer_info(js, str(config.durable_name))
            if existing is None:
                raise
    if existing is not None:
        config = dataclasses.replace(
            config, deliver_policy=existing.config.deliver_policy, opt_start_seq=existing.config.opt_start_seq
        )
    for info in old:
        await _retire(js, info, idle_seconds)
    return config


async def consume_events_batched(
    js: JetStreamContext,
    *,
    durable: str,
    subjects: Sequence[str],
    handle_batch: EventBatchHandler,
    handle_event: EventHandler | None = None,
    batch: int = 64,
    max_deliver: int = 10,
    retry_delay: float = 5.0,
    replaces: Sequence[str] = (),
    replaced_idle_seconds: float = 300.0,
) -> None:
    """Feeds every event on `subjects` through `handle_batch` a fetched batch at a time (one statement,
    publishes in flight together), then, in order, through `handle_event` one at a time; at least once,
    and with the per-event failures of consume_events (same durable configuration).

    An event is acked once both steps are done with it. A `handle_event` error redelivers that event
    alone after `retry_delay`. A `handle_batch` error takes the batch apart: each event goes through
    `handle_batch([event])` and `handle_event` on its own, so a bad event is retried alone, and logged
    and dropped after `max_deliver` tries, while the others of its batch are acked. Both handlers must
    be idempotent by event id: after such an error, events the batch step had already done are done
    again.

    `replaces` names durables of an earlier release whose work this one takes over: a new durable
    starts where the least advanced of them stands, and the server deletes them once they have been
    read by nobody for `replaced_idle_seconds` (see _taking_over).
    """

    async def both_steps(event: events_pb2.Event, *, with_batch_step: bool) -> None:
        if with_batch_step:
            await handle_batch([event])
        if handle_event is not None:
            await handle_event(event)

    async def one_at_a_time(
        message: Msg, event: events_pb2.Event, *, with_batch_step: bool, failed: Exception | None = None
    ) -> None:
        try:
            await _outlasting_outages(
                lambda: both_steps(event, with_batch_step=with_batch_step),
                [message],
                durable=durable,
                retry_delay=retry_delay,
                failed=failed,
            )
        except Exception:
            await _failed(message, event, durable=durable, max_deliver=max_deliver, retry_delay=retry_delay)
            return
        await message.ack()

    async def process(messages: list[Msg]) -> None:
        decoded = await _decoded(messages)
        if not decoded:
            return
        events = [event for _, event in decoded]
        try:
            await _outlasting_outages(
                lambda: handle_batch(events),
                [message for message, _ in decoded],
                durable=durable,
                retry_delay=retry_delay,
            )
        except Exception:
            if len(decoded) == 1:
                message, event = decoded[0]
                await _failed(
                    message, event, durable=durable, max_deliver=max_deliver, retry_delay=retry_delay
                )
                return
            log.warning(
                "event batch failed; its events are handled one at a time",
                exc_info=True,
                extra={"consumer": durable, "events": len(decoded)},
            )
            for message, event in decoded:
                await one_at_a_time(message, event, with_batch_step=True)
            return
        # The events handle_event is done with are acked together: at the end, before a failure
        # (whose retries may wait out an outage), and when the loop is stopped midway (or a stopped
        # worker's events would be routed again by another).
        done: list[Msg] = []
        try:
            for message, event in decoded:
                if handle_event is not None:
                    try:
                        await handle_event(event)
                    except Exception as exc:
                        handled, done = done, []
                        await ack_all(handled)
                        await one_at_a_time(message, event, with_batch_step=False, failed=exc)
                        continue
                done.append(message)
        finally:
            await ack_all(done)

    config = _per_event_config(durable, subjects, max_deliver)
    if replaces:
        config = await _taking_over(js, config, replaces, replaced_idle_seconds)
    await pull_forever(js, EVENTS.name, config, process, batch=batch)
