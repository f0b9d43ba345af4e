"""Micro-benchmark of the SendEmail accept path: CPU of the mesh per accepted message.

    .venv/bin/python benchmarks/accept_cpu.py [--messages 1500] [--runs 3] [--concurrency 16]
        [--baseline DIR]

Each run is a process of its own hosting the whole mesh in-process (MeshThread: every service, delivery
off, a private nats-server, a loopback DNS to verify the sending domain) with an account out of the
sandbox. A separate client process sends `--messages` SendEmail calls (~5 KB text, one recipient, as
`make bench`) with `--concurrency` in flight, after a warm-up; the figure is the mesh process's CPU
(user + system, every thread: gRPC, the event loop and the event consumers running meanwhile) over the
client's run, divided by the messages accepted. nats-server's CPU is not counted. Also printed (on
stderr with `--one`, or with `--peer`): the mesh's own event-loop thread apart from the other threads
(aiosqlite's, gRPC's), and the context switches per message.

`--peer` also measures, in the same run, a bare grpc.aio server (the same event loop, no interceptor, a
SendEmail that answers at once) sent the same calls by the same client: the per-call cost of gRPC
itself, the floor under the mesh's figure.

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
from typing import Any

import alternated

BODY = ("Benchmark message body line, plain text. " * 2 + "\n") * 60  # about 5 KB


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _switches() -> int:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_nvcsw + usage.ru_nivcsw


def _thread_cpu(native_id: int) -> float:
    """CPU seconds of one thread of this process (/proc)."""
    with open(f"/proc/self/task/{native_id}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class _Measured:
    """The process's CPU, one thread's, and the context switches, from start() to stop()."""

    def __init__(self, loop_thread: int) -> None:
        self.loop_thread = loop_thread

    def start(self) -> None:
        self._cpu, self._loop, self._switches = _cpu(), _thread_cpu(self.loop_thread), _switches()

    def stop(self, messages: int) -> dict[str, float]:
        cpu, loop = _cpu() - self._cpu, _thread_cpu(self.loop_thread) - self._loop
        return {
            "cpu_per_message": cpu / messages,
            "loop_thread_per_message": loop / messages,
            "other_threads_per_message": (cpu - loop) / messages,
            "switches_per_message": (_switches() - self._switches) / messages,
        }


def _report(name: str, figures: dict[str, float]) -> str:
    return (
        f"{name}: {figures['cpu_per_message'] * 1e3:.3f} ms CPU/message (event-loop thread "
        f"{figures['loop_thread_per_message'] * 1e3:.3f}, other threads "
        f"{figures['other_threads_per_message'] * 1e3:.3f}), "
        f"{figures['switches_per_message']:.1f} context switches/message"
    )


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


def _bare_grpc_run(messages: int, concurrency: int) -> dict[str, float]:
    """The same client against a bare grpc.aio server on the mesh's event loop, in a thread as
    MeshThread runs it: SendEmail answered at once, nothing else."""
    import threading

    import grpc
    from grpc import aio

    from postmesh.common import eventloop
    from postmesh.common.config import load_settings
    from postmesh.sender.v1 import sender_pb2

    async def send_email(request: Any, context: Any) -> Any:
        return sender_pb2.SendEmailResponse(message_id=f"{request.from_email_address}-0001")

    answering = grpc.method_handlers_generic_handler(
        "postmesh.sender.v1.SenderService",
        {
            "SendEmail": grpc.unary_unary_rpc_method_handler(
                send_email,
                request_deserializer=sender_pb2.SendEmailRequest.FromString,
                response_serializer=sender_pb2.SendEmailResponse.SerializeToString,
            )
        },
    )

    loop = eventloop.new_event_loop(load_settings({}).event_loop)
    thread = threading.Thread(target=loop.run_forever, name="bare-grpc", daemon=True)
    thread.start()

    async def start() -> tuple[Any, int]:
        server = aio.server()
        server.add_generic_rpc_handlers((answering,))
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        return server, port

    server, port = asyncio.run_coroutine_threadsafe(start(), loop).result(30)
    try:
        address = f"127.0.0.1:{port}"
        _send(address, "none", 0, 300, concurrency)
        assert thread.native_id is not None
        measured = _Measured(thread.native_id)
        measured.start()
        _send(address, "none", 1000, messages, concurrency)
        return measured.stop(messages)
    finally:
        asyncio.run_coroutine_threadsafe(server.stop(None), loop).result(30)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)


def _one_run(messages: int, concurrency: int) -> dict[str, float]:
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
            measured = _Measured(mesh.loop_thread_id)
            measured.start()
            refused = _send(mesh.address, key, 1000, messages, concurrency)
            figures = measured.stop(messages)
            if refused:
                raise RuntimeError(f"{refused} calls refused")
            # What the mesh's gRPC calls were, per message (on stderr: the logs' file).
            for method, count in sorted(_calls_by_method().items()):
                if count - calls.get(method, 0):
                    print(
                        f"{method}: {(count - calls.get(method, 0)) / messages:.3f} calls/message",
                        file=sys.stderr,
                    )
            print(_report("mesh", figures), file=sys.stderr)
            return figures
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
        print(json.dumps(_one_run(int(sys.argv[2]), int(sys.argv[3]))))
        return 0
    if len(sys.argv) > 1 and sys.argv[1] == "--peer-one":
        mesh = _one_run(int(sys.argv[2]), int(sys.argv[3]))
        bare = _bare_grpc_run(int(sys.argv[2]), int(sys.argv[3]))
        print(_report("the mesh (SendEmail accepted)", mesh))
        print(_report("a bare grpc.aio server (SendEmail answered at once)", bare))
        print(f"mesh / bare gRPC: {mesh['cpu_per_message'] / bare['cpu_per_message']:.1f}x CPU per call")
        return 0
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--messages", type=int, default=1500)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--baseline", type=Path, help="a copy of the tree before the change")
    parser.add_argument(
        "--peer", action="store_true", help="one run of this tree beside a bare grpc.aio server"
    )
    args = parser.parse_args()
    if args.peer:
        done = subprocess.run(
            [sys.executable, __file__, "--peer-one", str(args.messages), str(args.concurrency)],
            env={**os.environ, "PYTHONPATH": str(alternated.THIS_TREE)},
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            check=True,
        )
        sys.stdout.write(done.stdout.decode())
        return 0
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
