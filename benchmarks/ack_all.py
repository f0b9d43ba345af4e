"""Micro-benchmark of acking fetched JetStream messages: CPU per ack, nats-py's `msg.ack()` one at a
time against postmesh.common.pull.ack_all (a batch's acks in one write).

    PYTHONPATH=. .venv/bin/python benchmarks/ack_all.py [--messages 5000] [--batch 256] [--runs 3]

A private nats-server; each run fills a stream with `--messages` messages of about an event's size,
fetches them with a Puller in batches of `--batch` (as the event consumers do) and acks each batch
one way, alternating the two ways run by run. CPU is this process's (time.process_time), counted
only around the acks, divided by the messages; the run checks that the consumer has nothing left
pending or unacknowledged.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from pathlib import Path

import nats
from nats.aio.msg import Msg
from nats.js.api import AckPolicy, ConsumerConfig, StreamConfig

from postmesh.common.natsserver import NatsServerProcess
from postmesh.common.pull import Puller, ack_all

PAYLOAD = b"x" * 600


async def each(messages: list[Msg]) -> None:
    for message in messages:
        await message.ack()


WAYS = {"ack-each": each, "ack_all": ack_all}


async def one_run(workdir: Path, way: str, messages: int, batch: int) -> float:
    server = NatsServerProcess(workdir).start()
    nc = await nats.connect(server.url)
    try:
        js = nc.jetstream()
        await js.add_stream(StreamConfig(name="BENCH_ACK", subjects=["benchack.>"]))
        for start in range(0, messages, 500):
            await asyncio.gather(
                *(js.publish("benchack.x", PAYLOAD) for _ in range(min(500, messages - start)))
            )
        await js.add_consumer(
            "BENCH_ACK", ConsumerConfig(durable_name="bench", ack_policy=AckPolicy.EXPLICIT)
        )
        puller = await Puller.bind(js, stream="BENCH_ACK", durable="bench")
        acknowledge = WAYS[way]
        spent, got = 0.0, 0
        while got < messages:
            fetched = await puller.fetch(batch, timeout=5)
            got += len(fetched)
            start_cpu = time.process_time()
            await acknowledge(fetched)
            spent += time.process_time() - start_cpu
        await nc.flush()
        info = await js.consumer_info("BENCH_ACK", "bench")
        assert info.num_ack_pending == 0 and info.num_pending == 0, info
        await puller.unsubscribe()
        return spent / messages
    finally:
        await nc.close()
        server.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else "")
    parser.add_argument("--messages", type=int, default=5000)
    parser.add_argument("--batch", type=int, default=256, help="messages per fetch")
    parser.add_argument("--runs", type=int, default=3, help="runs of each way, alternating")
    args = parser.parse_args()
    results: dict[str, list[float]] = {way: [] for way in WAYS}
    for _ in range(args.runs):
        for way in WAYS:
            with tempfile.TemporaryDirectory(prefix="postmesh-ackbench-") as tmp:
                results[way].append(asyncio.run(one_run(Path(tmp), way, args.messages, args.batch)) * 1e6)
    for way, values in results.items():
        values.sort()
        print(
            f"{way}: CPU per ack min {values[0]:.2f} median {statistics.median(values):.2f} "
            f"max {values[-1]:.2f} µs"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
