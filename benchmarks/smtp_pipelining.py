"""Client CPU per message delivered by the SMTP transport, with and without PIPELINING (RFC 2920).

The sink is an aiosmtpd server (postmesh.testing_mail) in a process of its own, offering PIPELINING
or not; this process only delivers, over pooled connections, so its CPU time is the client's.

    .venv/bin/python benchmarks/smtp_pipelining.py [--messages 2000] [--recipients 1] [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import subprocess
import sys
import time

from postmesh.testing_mail import Behaviour, SmtpServer
from services.sender.transport import Envelope, Kind, SmtpOptions, SmtpPool, SmtpTransport

BODY = "Lorem ipsum dolor sit amet, consectetur adipiscing elit, sed do eiusmod.\r\n" * 50


def _message(n: int) -> bytes:
    return (
        f"From: news@b.test\r\nTo: user{n}@ok.test\r\nSubject: bench {n}\r\n"
        f"Message-ID: <bench-{n}@b.test>\r\n\r\n{BODY}.a line starting with a dot\r\n"
    ).encode()


def _serve(pipelining: bool) -> None:
    with SmtpServer(behaviour=Behaviour(pipelining=pipelining)) as server:
        print(server.port, flush=True)
        sys.stdin.read()  # until the parent closes our stdin


async def _deliver(port: int, messages: int, recipients: int, concurrency: int) -> tuple[float, float]:
    """(client CPU seconds, wall seconds) for `messages` deliveries."""
    options = SmtpOptions(helo_name="bench.test", timeout=30.0, max_connections_per_host=concurrency)
    transport = SmtpTransport(SmtpPool(options), smarthost=("127.0.0.1", port))
    queue = list(range(messages))

    async def worker() -> None:
        while queue:
            n = queue.pop()
            envelope = Envelope(
                message_id=f"m{n}",
                mail_from="bounce@b.test",
                recipients=tuple(f"user{n}-{r}@ok.test" for r in range(recipients)),
                domain="ok.test",
                require_tls=False,
            )
            outcomes = await transport.deliver(envelope, _message(n))
            assert all(o.kind is Kind.DELIVERED for o in outcomes.values()), outcomes

    await asyncio.gather(*(worker() for _ in range(concurrency)))  # warm: connections opened
    queue.extend(range(messages))
    cpu, wall = time.process_time(), time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    await transport.close()
    return cpu, wall


def _round(pipelining: bool, args: argparse.Namespace) -> tuple[float, float]:
    sink = subprocess.Popen(
        [sys.executable, __file__, "--serve", "1" if pipelining else "0"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert sink.stdout is not None
        port = int(sink.stdout.readline())
        return asyncio.run(_deliver(port, args.messages, args.recipients, args.concurrency))
    finally:
        assert sink.stdin is not None
        sink.stdin.close()
        sink.wait(30)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--messages", type=int, default=2000)
    parser.add_argument("--recipients", type=int, default=1)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--serve", choices=["0", "1"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve is not None:
        _serve(args.serve == "1")
        return
    results: dict[bool, list[tuple[float, float]]] = {False: [], True: []}
    for _ in range(args.rounds):
        for pipelining in (False, True):  # alternated, so drifting machine load hits both alike
            results[pipelining].append(_round(pipelining, args))
    print(
        f"{args.messages} messages x {args.recipients} recipient(s), {args.concurrency} connections,"
        f" median of {args.rounds}"
    )
    medians = {}
    for pipelining, runs in results.items():
        cpu = statistics.median(c for c, _ in runs) / args.messages * 1e6
        rate = statistics.median(args.messages / w for _, w in runs)
        medians[pipelining] = cpu
        name = "pipelined " if pipelining else "one-by-one"
        print(f"  {name}: client CPU {cpu:7.0f} us/message, {rate:6.0f} messages/s")
    print(f"  client CPU per message: {100 * (medians[True] / medians[False] - 1):+.0f}%")


if __name__ == "__main__":
    main()
