"""Micro-benchmark of the SendEmail accept path: CPU of the mesh per accepted message.

    .venv/bin/python benchmarks/accept_cpu.py [--messages 1500] [--runs 3] [--concurrency 16]
        [--baseline DIR]

Each run is a process of its own hosting the whole mesh in-process (MeshThread: every service, delivery
off, a private nats-server, a loopback DNS to verify the sending domain) with an account out of the
sandbox. A separate client process sends `--messages` SendEmail calls (~5 KB text, one recipient, as
`make bench`) with `--concurrency` in flight, after a warm-up; the figure is the mesh process's CPU
(user + system, every thread: gRPC, the event loop and the event consumers running meanwhile) over the
client's run, divided by the messages accepted. nats-server's CPU is not counted.

With `--baseline DIR` (a copy of the tree before a change, generated code included), runs alternate
between DIR and this tree; prints min / median / max per tree.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import alternated

BODY = ("Benchmark message body line, plain text. " * 2 + "\n") * 60  # about 5 KB


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def _client(address: str, key: str, first: int, count: int, concurrency: int) -> int:
    from grpc import aio

    from postmesh.sender.v1 import sender_pb2, sender_pb2_grpc

    channel = aio.insecure_channel(address)
    stub = sender_pb2_grpc.SenderServiceStub(channel)
    metadata = (("authorization", f"Bearer {key}"),)
    refused = 0

    async def loop(numbers: range) -> None:
        nonlocal refused
        for n in numbers:
            request = sender_pb2.SendEmailRequest(
                from_email_address="Bench <news@bench.test>",
                destination=sender_pb2.Destination(to_addresses=[f"user{n}@sink.test"]),
                content=sender_pb2.EmailContent(
                    simple=sender_pb2.Message(
                        subject=sender_pb2.Content(data=f"Benchmark {n}"),
                        body=sender_pb2.Body(text=sender_pb2.Content(data=BODY)),
                    )
                ),
            )
            try:
                await stub.SendEmail(request, metadata=metadata, timeout=60)
            except aio.AioRpcError as error:
                refused += 1
                if refused <= 3:
                    print(f"refused: {error.code().name} {error.details()}", file=sys.stderr)

    await asyncio.gather(*(loop(range(first + i, first + count, concurrency)) for i in range(concurrency)))
    await channel.close()
    return refused


def _send(address: str, key: str, first: int, count: int, concurrency: int) -> int:
    """Runs the client in a process of its own (its CPU is not the mesh's); returns the refusals."""
    done = subprocess.run(
        [sys.executable, __file__, "--client", address, key, str(first), str(count), str(concurrency)],
        check=True,
        stdout=subprocess.PIPE,
        env=os.environ,
    )
    return int(done.stdout.decode().split()[-1])


def _calls_by_method() -> dict[str, float]:
    from prometheus_client import REGISTRY

    calls: dict[str, float] = {}
    for metric in REGISTRY.collect():
        if metric.name == "postmesh_grpc_requests":
            for sample in metric.samples:
                if sample.name.endswith("_total"):
                    method = sample.labels["method"]
                    calls[method] = calls.get(method, 0.0) + sample.value
    return calls


def _one_run(messages: int, concurrency: int) -> float:
    from postmesh.client import Client
    from postmesh.common.logging import configure_logging
    from postmesh.common.natsserver import NatsServerProcess
    from postmesh.identity.v1 import identity_pb2
    from postmesh.quota.v1 import quota_pb2
    from postmesh.testing import MeshThread
    from postmesh.testing_mail import LoopbackDns

    configure_logging("INFO")  # as `postmesh serve` does (its stderr goes to a file here)
    with tempfile.TemporaryDirectory() as work:
        nats_server = NatsServerProcess(Path(work) / "nats").start()
        dns = LoopbackDns().start()
        mesh = MeshThread(
            nats_url=nats_server.url, data_dir=Path(work) / "mesh", dns_resolver=dns.address
        ).start()
        try:
            _, key = mesh.create_account("bench")
            with Client(mesh.address, key) as client:
                filed = client.quota.PutAccountDetails(
                    quota_pb2.PutAccountDetailsRequest(
                        mail_type=quota_pb2.MAIL_TYPE_TRANSACTIONAL,
                        website_url="https://bench.test",
                        use_case_description="Benchmark",
                        production_access_enabled=True,
                        expected_daily_volume=10_000_000,
                    )
                )
            with mesh.admin() as admin:
                admin.quota.GrantProductionAccess(
                    quota_pb2.GrantProductionAccessRequest(
                        case_id=filed.review_details.case_id, max_24_hour_send=1e9, max_send_rate=1e6
                    )
                )
            with Client(mesh.address, key) as client:
                created = client.identity.CreateEmailIdentity(
                    identity_pb2.CreateEmailIdentityRequest(email_identity="bench.test")
                )
                for record in created.dns_records:
                    dns.publish(record.name, record.type, record.value)
                checked = client.identity.CheckEmailIdentityVerification(
                    identity_pb2.CheckEmailIdentityVerificationRequest(email_identity="bench.test")
                ).identity
                assert checked.verification_status == identity_pb2.VERIFICATION_STATUS_SUCCESS
            _send(mesh.address, key, 0, 300, concurrency)  # warm-up: caches, leases, JIT-less imports
            time.sleep(1.0)
            calls = _calls_by_method()
            before = _cpu()
            refused = _send(mesh.address, key, 1000, messages, concurrency)
            spent = _cpu() - before
            if refused:
                raise RuntimeError(f"{refused} calls refused")
            # What the mesh's gRPC calls were, per message (on stderr: the logs' file).
            for method, count in sorted(_calls_by_method().items()):
                if count - calls.get(method, 0):
                    print(
                        f"{method}: {(count - calls.get(method, 0)) / messages:.3f} calls/message",
                        file=sys.stderr,
                    )
            return spent / messages
        finally:
            mesh.stop()
            dns.stop()
            nats_server.stop()


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--client":
        address, key, first, count, concurrency = sys.argv[2:7]
        print(asyncio.run(_client(address, key, int(first), int(count), int(concurrency))))
        return 0
    if len(sys.argv) > 1 and sys.argv[1] == "--one":
        print(json.dumps({"cpu_per_message": _one_run(int(sys.argv[2]), int(sys.argv[3]))}))
        return 0
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--messages", type=int, default=1500)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--baseline", type=Path, help="a copy of the tree before the change")
    args = parser.parse_args()
    alternated.compare(
        __file__,
        [args.messages, args.concurrency],
        "cpu_per_message",
        runs=args.runs,
        baseline=args.baseline,
        unit="ms CPU/message",
        scale=1e3,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
