"""Micro-benchmark of SendEmail's accept path in-process: CPU per accepted message.

    .venv/bin/python benchmarks/micro_accept.py [--messages 3000] [--runs 5] [--concurrency 16]
        [--baseline DIR]

SenderServicer.SendEmail called directly (no gRPC, no interceptor) with the sender's real Acceptor,
MeshChecks and SendQuotaClient in the state a busy account keeps them in (the sender authorized, the
suppression list known empty, a quota lease to take from: no call to another service), a private
nats-server (file storage, the mesh's streams) taking the queued message and its Send event. ~5 KB
text, one recipient, as `make bench`. CPU is this process's (time.process_time: the event loop and
nats-py, not nats-server), divided by the messages; `--concurrency` calls in flight.

With `--baseline DIR` (a copy of the tree before a change, generated code included), each run is a
process on DIR then on this tree, alternating the order; prints min / median / max per tree.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import alternated

BODY = ("Benchmark message body line, plain text. " * 2 + "\n") * 60  # about 5 KB
ACCOUNT = "111111111111"


async def _measure(messages: int, concurrency: int) -> float:
    import nats

    from postmesh.common.auth import Principal, PrincipalKind, principal_var
    from postmesh.common.bus import EventPublisher, ensure_streams
    from postmesh.common.eventloop import new_event_loop  # noqa: F401  (the loop is made in main)
    from postmesh.common.natsserver import NatsServerProcess
    from postmesh.common.sendquota import _Lease
    from postmesh.common.service import SystemClock
    from postmesh.sender.v1 import sender_pb2
    from services.sender.accept import Acceptor, Authorization
    from services.sender.idempotency import IdempotencyKeys
    from services.sender.mesh import MeshChecks
    from services.sender.servicer import SenderServicer

    with tempfile.TemporaryDirectory() as work:
        server = NatsServerProcess(Path(work)).start()
        nc = await nats.connect(server.url)
        try:
            js = nc.jetstream()
            await ensure_streams(js)
            clock = SystemClock()
            checks = MeshChecks(clients=None)  # type: ignore[arg-type]  # never called: all is kept
            checks._authorized.put(
                (ACCOUNT, "news@bench.test", ""), Authorization("bench.test", ACCOUNT, "", False, "")
            )
            checks._empty_lists.put(ACCOUNT, True)
            quota: Any = checks._quota
            quota._account(ACCOUNT).leases.append(_Lease("lease", 10**9, float("inf"), True))
            servicer = SenderServicer()
            servicer.acceptor = Acceptor(
                js=js,
                events=EventPublisher(js),
                checks=checks,
                templates=None,  # type: ignore[arg-type]
                keys=IdempotencyKeys(None, clock),  # type: ignore[arg-type]  # no request_id: no database
                clock=clock,
            )
            principal_var.set(Principal(PrincipalKind.ACCOUNT, account_id=ACCOUNT))

            def request(n: int) -> Any:
                return sender_pb2.SendEmailRequest(
                    from_email_address="Bench <news@bench.test>",
                    destination=sender_pb2.Destination(to_addresses=[f"user{n}@sink.test"]),
                    content=sender_pb2.EmailContent(
                        simple=sender_pb2.Message(
                            subject=sender_pb2.Content(data=f"Benchmark {n}"),
                            body=sender_pb2.Body(text=sender_pb2.Content(data=BODY)),
                        )
                    ),
                )

            async def send(first: int, count: int) -> None:
                async def loop(numbers: range) -> None:
                    for n in numbers:
                        await servicer.SendEmail(request(n), None)  # type: ignore[arg-type]

                await asyncio.gather(
                    *(loop(range(first + i, first + count, concurrency)) for i in range(concurrency))
                )

            await send(0, 300)  # warm-up
            started = time.process_time()
            await send(1000, messages)
            return (time.process_time() - started) / messages
        finally:
            await nc.close()
            server.stop()


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--one":
        from postmesh.common.eventloop import new_event_loop

        loop = new_event_loop("auto")
        per_message = loop.run_until_complete(_measure(int(sys.argv[2]), int(sys.argv[3])))
        print(json.dumps({"cpu_per_message": per_message}))
        return 0
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--messages", type=int, default=3000)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--baseline", type=Path, help="a copy of the tree before the change")
    args = parser.parse_args()
    alternated.compare(
        __file__,
        [args.messages, args.concurrency],
        "cpu_per_message",
        runs=args.runs,
        baseline=args.baseline,
        unit="µs CPU/message",
        scale=1e6,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
