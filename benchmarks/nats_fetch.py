"""CPU per message fetched and acked from a JetStream durable pull consumer: nats-py's
PullSubscription.fetch against postmesh.common.pull.Puller, on a local nats-server of its own.

    .venv/bin/python benchmarks/nats_fetch.py [--messages 5000] [--repeat 5] [--batch 64]

Two shapes, each run `repeat` times per fetcher (alternating, on a fresh stream each time):
- backlog: the messages are all in the stream before the first fetch (a busy mesh);
- trickle: another process publishes them one at a time, every `--interval` seconds, while the
  fetch loop runs (a quiet mesh: few messages per fetch, the per-fetch costs show).
Only this process's CPU is counted (time.process_time): the server and the trickling publisher run
elsewhere. Prints microseconds of CPU per message: min / median / max of the repeats (the machine is
shared: read ranges, not single figures)."""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import nats
import uvloop
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, StreamConfig

from postmesh.common.natsserver import NatsServerProcess
from postmesh.common.pull import Puller

STREAM, SUBJECT, DURABLE = "BENCH", "bench.fetch", "worker"
PAYLOAD = b"x" * 300
WAIT_SECONDS = 5.0

Fetch = Callable[[int], Awaitable[list[Msg]]]

# The trickling publisher: another process, so its CPU is not counted here.
TRICKLE = """
import asyncio, sys, nats
async def main(url, subject, size, count, interval):
    nc = await nats.connect(url)
    js = nc.jetstream()
    for _ in range(count):
        await js.publish(subject, b"x" * size)
        await asyncio.sleep(interval)
    await nc.close()
asyncio.run(main(sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), float(sys.argv[5])))
"""


async def _fresh_stream(js: JetStreamContext) -> None:
    try:
        await js.delete_stream(STREAM)
    except nats.js.errors.NotFoundError:
        pass
    await js.add_stream(StreamConfig(name=STREAM, subjects=[SUBJECT]))
    await js.add_consumer(
        STREAM, ConsumerConfig(durable_name=DURABLE, ack_policy=AckPolicy.EXPLICIT, ack_wait=60)
    )


async def _fetcher(js: JetStreamContext, kind: str) -> tuple[Fetch, Callable[[], Awaitable[None]]]:
    if kind == "nats-py":
        sub = await js.pull_subscribe_bind(durable=DURABLE, stream=STREAM)

        async def fetch_nats_py(batch: int) -> list[Msg]:
            try:
                return await sub.fetch(batch, timeout=WAIT_SECONDS)
            except (nats.errors.TimeoutError, TimeoutError):
                return []

        return fetch_nats_py, sub.unsubscribe
    puller = await Puller.bind(js, stream=STREAM, durable=DURABLE)

    async def fetch_puller(batch: int) -> list[Msg]:
        return await puller.fetch(batch, timeout=WAIT_SECONDS)

    return fetch_puller, puller.unsubscribe


async def _run(
    url: str, kind: str, shape: str, messages: int, batch: int, interval: float
) -> tuple[float, float]:
    """Microseconds of this process's CPU per message fetched and acked; messages per fetch."""
    nc = await nats.connect(url)
    js = nc.jetstream()
    try:
        await _fresh_stream(js)
        publisher = None
        if shape == "backlog":
            for _ in range(messages):
                await js.publish(SUBJECT, PAYLOAD)
        fetch, close = await _fetcher(js, kind)
        if shape == "trickle":
            publisher = await asyncio.create_subprocess_exec(
                sys.executable, "-c", TRICKLE, url, SUBJECT, str(len(PAYLOAD)), str(messages), str(interval)
            )
        got = fetches = 0
        started = time.process_time()
        while got < messages:
            batch_got = await fetch(batch)
            fetches += 1
            for message in batch_got:
                await message.ack()
            got += len(batch_got)
        await nc.flush()
        cpu = time.process_time() - started
        await close()
        if publisher is not None:
            await publisher.wait()
        return cpu / messages * 1e6, messages / fetches
    finally:
        await nc.close()


def _summary(figures: list[float]) -> str:
    return f"{min(figures):7.1f} / {statistics.median(figures):7.1f} / {max(figures):7.1f}"


async def main(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory(prefix="postmesh-natsfetch-") as folder:
        server = NatsServerProcess(Path(folder) / "nats").start()
        try:
            print(f"{args.messages} messages, batch {args.batch}; µs CPU per message, min / median / max")
            for shape in ("backlog", "trickle"):
                results: dict[str, list[tuple[float, float]]] = {"nats-py": [], "Puller": []}
                for _ in range(args.repeat):
                    for kind in results:
                        results[kind].append(
                            await _run(server.url, kind, shape, args.messages, args.batch, args.interval)
                        )
                for kind, runs in results.items():
                    cpu = _summary([r[0] for r in runs])
                    per_fetch = statistics.median(r[1] for r in runs)
                    print(f"  {shape:8} {kind:8} {cpu}   ({per_fetch:.1f} msgs/fetch)")
        finally:
            server.stop()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=5000)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--interval", type=float, default=0.002, help="trickle: seconds between messages")
    arguments = parser.parse_args()
    uvloop.run(main(arguments))
