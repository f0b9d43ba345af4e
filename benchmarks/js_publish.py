"""Micro-benchmark of confirmed JetStream publishes and synchronous acks: CPU per message, nats-py's
`js.publish` / `msg.ack_sync` against postmesh.common.jspublish's.

    .venv/bin/python benchmarks/js_publish.py [--messages 3000] [--runs 5] [--concurrency 1,16]

A private nats-server (file storage, as the mesh's streams). Each run publishes `--messages` events
(about the size of a Send event, a Nats-Msg-Id each, as EventPublisher does) with `concurrency`
publishes in flight, once per implementation, in alternating order; then fills a work-queue stream,
fetches it in batches and acks every message with ack_sync, one at a time (the delivery worker's
pattern). CPU is this process's (time.process_time: the event loop, not nats-server's), divided by
the messages; `--loop asyncio` runs on asyncio's own loop instead of uvloop. Prints min / median / max per
implementation.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path

import nats
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import RetentionPolicy, StorageType, StreamConfig

from postmesh.common import jspublish
from postmesh.common.eventloop import new_event_loop
from postmesh.common.natsserver import NatsServerProcess

PAYLOAD = b"x" * 600  # about a serialized Send event
STREAM = "BENCH"
WORK = "BENCH_WORK"

Publish = Callable[[JetStreamContext, str, bytes, dict[str, str]], Awaitable[object]]
Ack = Callable[[Msg], Awaitable[object]]


async def _nats_py_publish(
    js: JetStreamContext, subject: str, payload: bytes, headers: dict[str, str]
) -> object:
    return await js.publish(subject, payload, headers=headers)


async def _lean_publish(
    js: JetStreamContext, subject: str, payload: bytes, headers: dict[str, str]
) -> object:
    return await jspublish.publish(js, subject, payload, headers=headers)


async def _nats_py_ack(msg: Msg) -> object:
    return await msg.ack_sync(timeout=5.0)


async def _lean_ack(msg: Msg) -> object:
    return await jspublish.ack_sync(msg, wait_seconds=5.0)


PUBLISHES: dict[str, Publish] = {"nats-py": _nats_py_publish, "jspublish": _lean_publish}
ACKS: dict[str, Ack] = {"nats-py": _nats_py_ack, "jspublish": _lean_ack}


async def publish_cpu(js: JetStreamContext, publish: Publish, messages: int, concurrency: int) -> float:
    """CPU seconds per confirmed publish."""

    async def one_lane(lane: int) -> None:
        for i in range(lane, messages, concurrency):
            await publish(js, f"bench.events.{i % 7}", PAYLOAD, {"Nats-Msg-Id": uuid.uuid4().hex})

    await publish(js, "bench.events.warm", PAYLOAD, {"Nats-Msg-Id": uuid.uuid4().hex})
    start = time.process_time()
    await asyncio.gather(*(one_lane(lane) for lane in range(concurrency)))
    return (time.process_time() - start) / messages


async def ack_cpu(js: JetStreamContext, ack: Ack, messages: int) -> float:
    """CPU seconds per ack_sync (the fetches are not counted)."""
    for i in range(messages):
        await js.publish("bench.work.x", PAYLOAD, headers={"Nats-Msg-Id": f"w{uuid.uuid4().hex}{i}"})
    subscription = await js.pull_subscribe("bench.work.x", durable="bench", stream=WORK)
    spent, acked = 0.0, 0
    while acked < messages:
        batch = await subscription.fetch(min(256, messages - acked), timeout=5)
        start = time.process_time()
        for msg in batch:
            await ack(msg)
        spent += time.process_time() - start
        acked += len(batch)
    await subscription.unsubscribe()
    await js.delete_consumer(WORK, "bench")
    return spent / messages


def _report(title: str, figures: dict[str, list[float]]) -> None:
    print(title)
    for name, values in figures.items():
        micro = sorted(v * 1e6 for v in values)
        print(
            f"  {name:10} µs CPU/msg: min {micro[0]:6.1f}  median {statistics.median(micro):6.1f}"
            f"  max {micro[-1]:6.1f}  ({len(micro)} runs)"
        )
    base, lean = statistics.median(figures["nats-py"]), statistics.median(figures["jspublish"])
    print(f"  median saving: {(1 - lean / base) * 100:.0f}%")


async def main(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory() as store:
        server = NatsServerProcess(Path(store)).start()
        try:
            nc = await nats.connect(server.url)
            js = nc.jetstream()
            await js.add_stream(
                StreamConfig(name=STREAM, subjects=["bench.events.>"], storage=StorageType.FILE)
            )
            await js.add_stream(
                StreamConfig(
                    name=WORK,
                    subjects=["bench.work.>"],
                    storage=StorageType.FILE,
                    retention=RetentionPolicy.WORK_QUEUE,
                )
            )
            for concurrency in args.concurrency:
                figures: dict[str, list[float]] = {name: [] for name in PUBLISHES}
                for run in range(args.runs):
                    order = list(PUBLISHES) if run % 2 == 0 else list(reversed(PUBLISHES))
                    for name in order:
                        figures[name].append(
                            await publish_cpu(js, PUBLISHES[name], args.messages, concurrency)
                        )
                _report(
                    f"confirmed publish, {concurrency} in flight, {args.messages} messages per run", figures
                )
            figures = {name: [] for name in ACKS}
            for run in range(args.runs):
                order = list(ACKS) if run % 2 == 0 else list(reversed(ACKS))
                for name in order:
                    figures[name].append(await ack_cpu(js, ACKS[name], args.messages))
            _report(f"ack_sync, one at a time, {args.messages} messages per run", figures)
            await nc.close()
        finally:
            server.stop()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--messages", type=int, default=3000)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--concurrency", type=lambda s: [int(c) for c in s.split(",")], default=[1, 16])
    parser.add_argument("--loop", default="uvloop", choices=("asyncio", "uvloop"))
    arguments = parser.parse_args()
    loop = new_event_loop(arguments.loop)
    try:
        loop.run_until_complete(main(arguments))
    finally:
        loop.close()
