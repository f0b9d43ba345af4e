"""Micro-benchmark of the queued-copy ledger: CPU per first_copy (a new message id recorded in the
key-value bucket), nats-py's `KeyValue.create` against postmesh.common.outbound.first_copy.

    .venv/bin/python benchmarks/micro_first_copy.py [--messages 2000] [--runs 5] [--concurrency 16]

A private nats-server; the ledger bucket as the delivery workers declare it. Each run records
`--messages` fresh message ids with `concurrency` in flight, once per implementation, in alternating
order. CPU is this process's (time.process_time), divided by the messages; uvloop, as `serve` runs.
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
from nats.js.errors import KeyWrongLastSequenceError
from nats.js.kv import KeyValue

from postmesh.common.eventloop import new_event_loop
from postmesh.common.natsserver import NatsServerProcess
from postmesh.common.outbound import first_copy, queued_ledger

Record = Callable[[KeyValue, str, int], Awaitable[bool]]


async def _nats_py(ledger: KeyValue, message_id: str, sequence: int) -> bool:
    """first_copy as it was: nats-py's create."""
    mine = str(sequence).encode()
    try:
        await ledger.create(message_id, mine)
        return True
    except KeyWrongLastSequenceError:
        entry = await ledger.get(message_id)
        return entry.value == mine


async def _run(ledger: KeyValue, record: Record, messages: int, concurrency: int) -> float:
    ids = [uuid.uuid4().hex for _ in range(messages)]

    async def worker(start: int) -> None:
        for n in range(start, messages, concurrency):
            assert await record(ledger, ids[n], n + 1)

    cpu = time.process_time()
    await asyncio.gather(*(worker(start) for start in range(concurrency)))
    return (time.process_time() - cpu) / messages


async def _main(url: str, args: argparse.Namespace) -> dict[str, list[float]]:
    nc = await nats.connect(url)
    ledger = await queued_ledger(nc.jetstream())
    results: dict[str, list[float]] = {"nats-py create": [], "first_copy": []}
    await _run(ledger, first_copy, 200, args.concurrency)  # warm: the reply subscription
    for _ in range(args.runs):
        results["nats-py create"].append(await _run(ledger, _nats_py, args.messages, args.concurrency))
        results["first_copy"].append(await _run(ledger, first_copy, args.messages, args.concurrency))
    await nc.close()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--messages", type=int, default=2000)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--concurrency", type=int, default=16)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        server = NatsServerProcess(Path(tmp)).start()
        try:
            loop = new_event_loop("uvloop")
            try:
                results = loop.run_until_complete(_main(server.url, args))
            finally:
                loop.close()
        finally:
            server.stop()
    for name, runs in results.items():
        us = [r * 1e6 for r in runs]
        print(f"{name:>15}: {min(us):6.0f} / {statistics.median(us):6.0f} / {max(us):6.0f} us per message")


if __name__ == "__main__":
    main()
