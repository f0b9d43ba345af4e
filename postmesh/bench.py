"""`make bench`: how fast postmesh accepts and delivers, against the targets and Postfix+opendkim.

Everything runs on this machine, on loopback: a nats-server, a DNS server (identities verify through
it), an SMTP sink in a process of its own, and `postmesh serve all` in another, once per shape
measured (1 and 2 worker processes by default, side by side in one table). An account verifies its
sending domain (Easy DKIM, RSA-2048) and the sink's domain, then SendEmail is called from many
concurrent gRPC calls. Accepted/s is measured at the client; delivered/s from the first call to the
last Delivery event (the sink's 250 to a DKIM-signed message). Then: the same messages over SMTP; an
open-loop phase offering a fixed rate whatever the replies (accept latency at that rate); Postfix +
OpenDKIM relaying the same messages into the same sink; and a mesh that accepts `--queued` messages
with delivery off (DELIVERY_WORKERS=0: they stay queued in JetStream) for the peak RSS of each process.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import collections
import datetime as dt
import math
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Coroutine
from dataclasses import dataclass
from email.message import EmailMessage
from email.utils import format_datetime
from pathlib import Path
from typing import Any, TypeVar

import nats
import nats.js.errors
from grpc import aio
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from postmesh import bench_proc as proc
from postmesh import bench_report as report
from postmesh.client import Client
from postmesh.common import eventloop
from postmesh.common.natsserver import NatsServerProcess, free_port
from postmesh.common.outbound import enqueue
from postmesh.common.streams import EMAIL_EVENTS_SUBJECT, EVENTS
from postmesh.events.v1 import events_pb2
from postmesh.identity.v1 import identity_pb2
from postmesh.quota.v1 import quota_pb2
from postmesh.sender.v1 import queue_pb2, sender_pb2, sender_pb2_grpc
from postmesh.testing_scanners import ClamdProcess, find_binary

T = TypeVar("T")

TARGET_ACCEPTED = 1000.0
TARGET_DELIVERED = 500.0
TARGET_RSS_MB = 300.0
# End to end against Postfix + OpenDKIM measured in the same run (postmesh.benchpeer).
TARGET_RATIO = 3.0
TARGET_CPU_MS = 1.5  # CPU per message over every postmesh process, accept and delivery together
TARGET_OPEN_LOOP_P99_MS = 50.0  # accept latency at 500 msg/s offered
# Each wait for deliveries is bounded, and so is the run (a budget per mesh started).
DELIVERY_WAIT_SECONDS = 30.0
SECONDS_PER_MESH = 150
# The second pass with clamd scanning every message (when clamav-daemon is installed).
VIRUS_SCAN_SECONDS = 70
BODY = ("postmesh benchmark message body. " * 150)[:4800]  # ~5 KB, as the Postfix figure used
# The bench's own client loop, the same whatever loop the mesh is measured on.
CLIENT_LOOP = "auto"


def _run(coro: Coroutine[Any, Any, T]) -> T:
    return eventloop.run(coro, CLIENT_LOOP)


def _queued_message(account_id: str, n: int) -> queue_pb2.QueuedMessage:
    """A message as the accept side queues it (final MIME with Message-ID and Date)."""
    message_id = f"bench-{uuid.uuid4().hex}"
    mime = EmailMessage()
    mime["From"] = "Bench <news@bench.test>"
    mime["To"] = f"user{n}@sink.test"
    mime["Subject"] = f"Queued benchmark {n}"
    mime["Date"] = format_datetime(dt.datetime.now(dt.UTC))
    mime["Message-ID"] = f"<{message_id}@bench.test>"
    mime.set_content(BODY)
    queued = queue_pb2.QueuedMessage(
        message_id=message_id,
        account_id=account_id,
        from_address="news@bench.test",
        from_identity="bench.test",
        identity_owner_account_id=account_id,
        recipients=[f"user{n}@sink.test"],
        mime=mime.as_bytes(),
        subject=f"Queued benchmark {n}",
    )
    queued.accepted_time.FromDatetime(dt.datetime.now(dt.UTC))
    return queued


def _request(n: int) -> sender_pb2.SendEmailRequest:
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


class SendEmailCalls:
    """SendEmail over `connections` TCP connections of their own (gRPC shares one between channels of
    the same target otherwise), so that the kernel spreads them over the workers of `serve all`, as it
    does many clients'."""

    def __init__(self, address: str, key: str, connections: int = 8) -> None:
        self.channels = [
            aio.insecure_channel(address, options=[("grpc.use_local_subchannel_pool", 1)])
            for _ in range(connections)
        ]
        self.stubs = [sender_pb2_grpc.SenderServiceStub(c) for c in self.channels]
        self.metadata = (("authorization", f"Bearer {key}"),)
        # Why calls were refused ("CODE: details"), said on stderr at close: a refusal is a finding.
        self.refusals: collections.Counter[str] = collections.Counter()

    async def send(self, n: int) -> float | None:
        """Sends message `n`: its accept latency in seconds, None when it was refused."""
        started = time.perf_counter()
        try:
            await self.stubs[n % len(self.stubs)].SendEmail(_request(n), metadata=self.metadata, timeout=30)
        except aio.AioRpcError as error:
            self.refusals[f"{error.code().name}: {(error.details() or '')[:120]}"] += 1
            return None
        return time.perf_counter() - started

    async def closed_loop(self, numbers: range, concurrency: int) -> tuple[list[float], int]:
        """Sends `numbers` from `concurrency` loops of one call at a time: (latencies, refusals)."""
        latencies: list[float] = []

        async def loop(share: range) -> None:
            for n in share:
                latency = await self.send(n)
                if latency is not None:
                    latencies.append(latency)

        first, count = numbers.start, len(numbers)
        await asyncio.gather(
            *(loop(range(first + i, first + count, concurrency)) for i in range(concurrency))
        )
        return latencies, count - len(latencies)

    async def close(self) -> None:
        for channel in self.channels:
            await channel.close()
        for reason, count in self.refusals.most_common():
            print(f"bench: {count} SendEmail call(s) refused: {reason}", file=sys.stderr)


@dataclass(frozen=True)
class Shape:
    """One column of the table: `serve all` in `processes` worker processes on event loop `loop`
    ('': EVENT_LOOP as the environment or its default says)."""

    processes: int
    loop: str = ""

    def label(self, with_loop: bool) -> str:
        name = f"{self.processes} process" + ("es" if self.processes > 1 else "")
        return f"{name}, {self.loop or 'default loop'}" if with_loop else name


class Bench:
    def __init__(
        self,
        workdir: Path,
        messages: int,
        concurrency: int,
        delivery_processes: int,
        *,
        serve_processes: int = 1,
        event_loop: str = "",
        log_level: str = "WARNING",
        profile: str = "",
        sandbox: bool = False,
        extra_env: dict[str, str] | None = None,
    ) -> None:
        self.extra_env = extra_env or {}
        self.sandbox = sandbox
        self.workdir = workdir
        self.log_level = log_level
        self.profile = profile
        self.messages = messages
        self.concurrency = concurrency
        self.delivery_processes = delivery_processes
        self.serve_processes = serve_processes
        self.event_loop = event_loop
        self.processes: list[subprocess.Popen[bytes]] = []
        self.deliverers: list[subprocess.Popen[bytes]] = []

    def start(self) -> None:
        from postmesh.testing import LOOPBACK_PROCESS_ENV
        from postmesh.testing_mail import LoopbackDns

        self.workdir.mkdir(parents=True, exist_ok=True)
        self.nats = NatsServerProcess(self.workdir / "nats").start()
        self.dns = LoopbackDns().start()
        sink_port = self.sink_port = free_port()
        self.sink_count = self.workdir / "sink-count"
        self.sink = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "postmesh.bench",
                "--sink",
                str(sink_port),
                "--sink-count",
                str(self.sink_count),
            ],
            stdout=subprocess.PIPE,
        )
        assert self.sink.stdout is not None
        self.sink.stdout.readline()
        self.processes.append(self.sink)
        self.port = free_port()
        self.smtp_port = free_port()
        from services.sender.smtp.tls import write_self_signed

        write_self_signed(self.workdir / "smtp-cert.pem", self.workdir / "smtp-key.pem")
        self.admin_key = secrets.token_urlsafe(24)
        self.service_key = secrets.token_urlsafe(24)
        env = {
            **os.environ,
            **LOOPBACK_PROCESS_ENV,
            "NATS_URL": self.nats.url,
            "DATA_DIR": str(self.workdir / "var"),
            "GRPC_LISTEN": f"127.0.0.1:{self.port}",
            "METRICS_PORT": "0",
            "LOG_LEVEL": self.log_level,
            "ADMIN_API_KEY": self.admin_key,
            "SERVICE_API_KEY": self.service_key,
            "DKIM_MASTER_KEYS": f"bench:{base64.urlsafe_b64encode(secrets.token_bytes(32)).decode()}",
            "IDENTITY_HTTP_LISTEN": "127.0.0.1:0",
            "TRACKING_HTTP_LISTEN": "127.0.0.1:0",
            "SNS_HTTPS_LISTEN": "127.0.0.1:0",
            "INBOUND_SMTP_LISTEN": "127.0.0.1:0",
            "DNS_RESOLVER": self.dns.address,
            "DNS_CHECK_POLL_SECONDS": "3600",
            # With --sandbox, the bench account stays there: every recipient is then checked.
            "SANDBOX_MAX_SEND_RATE": "1000000",
            "SANDBOX_MAX_24_HOUR_SEND": "1000000000",
            "DELIVERY_MODE": "smarthost",
            "SMARTHOST": f"127.0.0.1:{sink_port}",
            "SMARTHOST_TLS": "none",
            # With delivery replicas of their own, the all-in-one process only accepts.
            "DELIVERY_WORKERS": "0" if self.delivery_processes else "64",
            "SMTP_STARTTLS_LISTEN": f"127.0.0.1:{self.smtp_port}",
            "SMTP_TLS_CERT_FILE": str(self.workdir / "smtp-cert.pem"),
            "SMTP_TLS_KEY_FILE": str(self.workdir / "smtp-key.pem"),
            "SERVE_PROCESSES": str(self.serve_processes),
            **({"EVENT_LOOP": self.event_loop} if self.event_loop else {}),
            **self.extra_env,
        }
        log = (self.workdir / "postmesh.log").open("wb")
        self.mesh = subprocess.Popen(
            [sys.executable, "-m", "postmesh.cli.main", "serve", "all"], env=env, stdout=log, stderr=log
        )
        self.processes.append(self.mesh)
        proc.wait_serving(self.address, time.monotonic() + 60)
        if self.serve_processes > 1:
            proc.wait_workers(self.mesh.pid, self.serve_processes, self.address, time.monotonic() + 90)
        if self.profile:
            # Samples the all-in-one process until it exits (py-spy: `pip install py-spy`).
            subprocess.Popen(
                [
                    shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy")),
                    "record",
                    "--subprocesses",
                    "-p",
                    str(self.mesh.pid),
                    "-r",
                    "100",
                    "-f",
                    "raw",
                    "-o",
                    self.profile,
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        for n in range(self.delivery_processes):
            port = free_port()
            replica_env = {
                **env,
                "SMTP_STARTTLS_LISTEN": "",
                "GRPC_LISTEN": f"127.0.0.1:{port}",
                "DATA_DIR": str(self.workdir / f"sender{n}"),
                "IDENTITY_ENDPOINT": self.address,
                "QUOTA_ENDPOINT": self.address,
                "FEEDBACK_ENDPOINT": self.address,
                "DELIVERY_WORKERS": "64",
            }
            replica = subprocess.Popen(
                [sys.executable, "-m", "postmesh.cli.main", "serve", "sender"],
                env=replica_env,
                stdout=log,
                stderr=log,
            )
            self.processes.append(replica)
            self.deliverers.append(replica)
            proc.wait_serving(f"127.0.0.1:{port}", time.monotonic() + 60)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def cpu_seconds(self) -> dict[str, float]:
        """CPU time used so far by each process of the bench (user + system)."""
        named = {
            **{f"postmesh serve sender #{n + 1}": p.pid for n, p in enumerate(self.deliverers)},
            "SMTP sink": self.sink.pid,
        }
        if self.nats.process is not None:
            named["nats-server"] = self.nats.process.pid
        seconds = {name: proc.cpu_seconds(pid) for name, pid in named.items()}
        seconds["postmesh serve all"] = proc.cpu_seconds_of_serve(self.mesh.pid)
        seconds["bench client (this)"] = time.process_time()
        return seconds

    def peak_rss(self) -> dict[str, float]:
        """Peak RSS of each process: `serve all`'s (each worker and the supervisor), the delivery
        replicas', the sink's and nats-server's."""
        return {
            **{f"postmesh {name}": mb for name, mb in proc.peak_rss_of_serve(self.mesh.pid).items()},
            **{
                f"postmesh serve sender #{n + 1}": proc.peak_rss_mb(p.pid)
                for n, p in enumerate(self.deliverers)
            },
            "SMTP sink (aiosmtpd)": proc.peak_rss_mb(self.sink.pid),
            "nats-server": proc.peak_rss_mb(self.nats.process.pid) if self.nats.process else float("nan"),
        }

    def stop(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                process.terminate()
                try:
                    process.wait(15)
                except subprocess.TimeoutExpired:
                    process.kill()
        self.dns.stop()
        self.nats.stop()

    def set_up_account(self) -> tuple[str, str, int]:
        """An account whose sending domain and the sink's domain are verified, out of the sandbox with
        a quota far above what the bench sends (unless --sandbox); its DKIM key size."""
        with Client(self.address, self.admin_key) as admin:
            reply = admin.identity.CreateAccount(identity_pb2.CreateAccountRequest(name="bench"))
            account_id, key = reply.account.account_id, reply.api_key_secret
            if not self.sandbox:
                with Client(self.address, key) as client:
                    filed = client.quota.PutAccountDetails(
                        quota_pb2.PutAccountDetailsRequest(
                            mail_type=quota_pb2.MAIL_TYPE_TRANSACTIONAL,
                            website_url="https://bench.test",
                            use_case_description="Benchmark",
                            production_access_enabled=True,
                            expected_daily_volume=10_000_000,
                        )
                    )
                admin.quota.GrantProductionAccess(
                    quota_pb2.GrantProductionAccessRequest(
                        case_id=filed.review_details.case_id, max_24_hour_send=1e9, max_send_rate=1e6
                    )
                )
        with Client(self.address, key) as client:
            for domain in ("bench.test", "sink.test"):
                created = client.identity.CreateEmailIdentity(
                    identity_pb2.CreateEmailIdentityRequest(email_identity=domain)
                )
                for record in created.dns_records:
                    self.dns.add_txt(record.name, record.value)
                checked = client.identity.CheckEmailIdentityVerification(
                    identity_pb2.CheckEmailIdentityVerificationRequest(email_identity=domain)
                ).identity
                if checked.verification_status != identity_pb2.VERIFICATION_STATUS_SUCCESS:
                    raise RuntimeError(f"{domain} did not verify")
        with Client(self.address, self.service_key) as service:
            config = service.identity.GetSigningConfig(
                identity_pb2.GetSigningConfigRequest(account_id=account_id, domain="bench.test")
            )
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import rsa

        bits = 0
        for signing_key in config.keys:
            loaded = serialization.load_pem_private_key(signing_key.private_key_pem.encode(), None)
            if isinstance(loaded, rsa.RSAPrivateKey):
                bits = loaded.key_size
                # The Postfix peer signs with the very same key, selector and domain.
                self.rsa_key = (signing_key.private_key_pem.encode(), signing_key.selector)
        return account_id, key, bits

    def run_postfix_peer(self) -> dict[str, Any]:
        """The same burst relayed by Postfix + OpenDKIM into the same sink, over SMTP with the same
        concurrency; its rate from the first message submitted to the last one the sink took."""
        from postmesh import benchpeer

        why = benchpeer.missing()
        if why or not getattr(self, "rsa_key", None):
            return {"skipped": why or "no RSA key to sign with"}
        key_pem, selector = self.rsa_key
        peer = benchpeer.PostfixPeer(
            self.workdir / "postfix",
            sink_port=self.sink_port,
            key_pem=key_pem,
            domain="bench.test",
            selector=selector,
        )
        try:
            peer.start()
            # Warm-up, then the measured burst.
            before = proc.sink_count(self.sink_count)
            warm = [benchpeer.bench_message(n, BODY, "bench.test") for n in range(40)]
            _run(benchpeer.submit(peer.port, warm, 8, "news@bench.test"))
            proc.wait_count(self.sink_count, before + len(warm), DELIVERY_WAIT_SECONDS)
            messages = [benchpeer.bench_message(n, BODY, "bench.test") for n in range(self.messages)]
            before = proc.sink_count(self.sink_count)
            cpu_before = proc.cpu_seconds_of_instance(peer.dir)
            started = time.perf_counter()
            taken = _run(benchpeer.submit(peer.port, messages, min(self.concurrency, 64), "news@bench.test"))
            arrived, finished = proc.wait_count(self.sink_count, before + taken, DELIVERY_WAIT_SECONDS)
            seconds = finished - started
            return {
                "relayed": arrived - before,
                "relayed_per_s": (arrived - before) / seconds if seconds > 0 else 0.0,
                "cpu_seconds": proc.cpu_seconds_of_instance(peer.dir) - cpu_before,
            }
        except Exception as exc:  # the peer failed to run: say why, keep postmesh's figures
            return {"skipped": f"{exc}; {peer.log_tail()[-400:]}"}
        finally:
            peer.stop()

    async def run(self, account_id: str, key: str, *, drain: bool = True) -> dict[str, Any]:
        """The closed-loop burst (`concurrency` calls in flight) until every message is delivered,
        then (with `drain`) the same number put straight on the outbound queue and delivered."""
        nc = await nats.connect(self.nats.url)
        js = nc.jetstream()
        deliveries = await js.pull_subscribe(
            EMAIL_EVENTS_SUBJECT,
            stream=EVENTS.name,
            # Never reaped for idling while the mesh is busy elsewhere (the SMTP phase, a slow start).
            config=ConsumerConfig(
                deliver_policy=DeliverPolicy.NEW, ack_policy=AckPolicy.NONE, inactive_threshold=600.0
            ),
        )
        delivered = 0
        last_delivery = 0.0
        kinds: collections.Counter[str] = collections.Counter()

        async def count_deliveries(until: int) -> None:
            nonlocal delivered, last_delivery
            while delivered < until:
                try:
                    batch = await deliveries.fetch(1000, timeout=1.0)
                except (TimeoutError, nats.errors.TimeoutError):
                    continue
                except nats.js.errors.ServiceUnavailableError:
                    # JetStream overloaded for a moment (2 cores, everything on them): ask again.
                    await asyncio.sleep(0.2)
                    continue
                for msg in batch:
                    event = events_pb2.Event.FromString(msg.data)
                    if event.account_id != account_id:
                        continue
                    kinds[events_pb2.EmailEventType.Name(event.email.event_type)] += 1
                    if event.email.event_type == events_pb2.EMAIL_EVENT_TYPE_DELIVERY:
                        delivered += 1
                        last_delivery = time.perf_counter()

        calls = SendEmailCalls(self.address, key)
        # Warm-up: connections, caches, the signing key.
        _, refused = await calls.closed_loop(range(0, 40), 8)
        await count_deliveries(40 - refused)
        delivered = 0

        total = self.messages
        counter = asyncio.create_task(count_deliveries(total))
        cpu_before = self.cpu_seconds()
        started = time.perf_counter()
        latencies, failures = await calls.closed_loop(range(total), self.concurrency)
        accept_seconds = time.perf_counter() - started
        cpu = {name: seconds - cpu_before[name] for name, seconds in self.cpu_seconds().items()}
        try:
            await asyncio.wait_for(counter, timeout=DELIVERY_WAIT_SECONDS)
        except TimeoutError:
            pass
        deliver_seconds = (last_delivery or time.perf_counter()) - started
        # Accept and delivery together, every postmesh process: the figure that travels between machines.
        e2e_cpu = sum(
            seconds - cpu_before[name]
            for name, seconds in self.cpu_seconds().items()
            if name.startswith("postmesh")
        )

        # The delivery pipeline alone: the same burst put straight on the outbound queue.
        queued = [_queued_message(account_id, n) for n in range(total if drain else 0)]
        delivered_before = delivered
        counter = asyncio.create_task(count_deliveries(delivered_before + total))
        cpu_before = self.cpu_seconds()
        started = time.perf_counter()
        for message in queued:
            await enqueue(js, message)
        enqueue_seconds = time.perf_counter() - started
        try:
            await asyncio.wait_for(counter, timeout=DELIVERY_WAIT_SECONDS if drain else 0)
        except TimeoutError:
            pass
        drained = delivered - delivered_before
        drain_seconds = (last_delivery - started) if drain else 0.0
        drain_cpu = {name: seconds - cpu_before[name] for name, seconds in self.cpu_seconds().items()}
        await calls.close()
        await nc.close()
        return {
            "accepted": len(latencies),
            "failures": failures,
            "accepted_per_s": len(latencies) / accept_seconds,
            "p50_ms": report.percentile(latencies, 0.50) * 1000,
            "p99_ms": report.percentile(latencies, 0.99) * 1000,
            "delivered_per_s": delivered_before / deliver_seconds if deliver_seconds > 0 else 0.0,
            "delivered": delivered_before,
            "enqueued_per_s": total / enqueue_seconds if enqueue_seconds > 0 else float("nan"),
            "drained": drained,
            "drained_per_s": drained / drain_seconds if drain_seconds > 0 else float("nan"),
            "cpu": cpu,
            "cpu_ms_per_message": report.per_message_ms(e2e_cpu, delivered_before),
            "drain_cpu": drain_cpu,
            "drain_seconds": drain_seconds or float("nan"),
            "accept_seconds": accept_seconds,
            "other_events": ", ".join(
                f"{n} {k.removeprefix('EMAIL_EVENT_TYPE_').lower()}"
                for k, n in sorted(kinds.items())
                if k != "EMAIL_EVENT_TYPE_DELIVERY"
            ),
        }

    async def run_open_loop(self, key: str, offered: float, seconds: float) -> dict[str, float]:
        """SendEmail at a fixed offered rate for `seconds`, each call started on time whatever the
        earlier ones are doing (an open loop: many clients, not `concurrency` of them waiting on their
        replies). The latency of each call runs from its start; `achieved` says if the bench's own
        client kept up with the offered rate."""
        calls = SendEmailCalls(self.address, key, connections=16)
        await calls.closed_loop(range(0, 40), 8)  # warm-up: connections and caches
        latencies: list[float] = []

        async def one(n: int) -> None:
            latency = await calls.send(n)
            if latency is not None:
                latencies.append(latency)

        total = max(1, round(offered * seconds))
        tasks = []
        started = time.perf_counter()
        for n in range(total):
            delay = started + n / offered - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(n)))
        offered_seconds = time.perf_counter() - started
        await asyncio.gather(*tasks)
        finished = time.perf_counter() - started
        await calls.close()
        return {
            "offered_per_s": offered,
            "achieved_per_s": total / offered_seconds if offered_seconds > 0 else float("nan"),
            "accepted": len(latencies),
            "failures": total - len(latencies),
            "accepted_per_s": len(latencies) / finished,
            "p50_ms": report.percentile(latencies, 0.50) * 1000,
            "p99_ms": report.percentile(latencies, 0.99) * 1000,
        }

    async def run_accept_only(self, key: str, count: int) -> dict[str, float]:
        """`count` SendEmail calls, `concurrency` in flight, nothing else measured (the queued phase)."""
        calls = SendEmailCalls(self.address, key)
        started = time.perf_counter()
        latencies, failures = await calls.closed_loop(range(count), self.concurrency)
        seconds = time.perf_counter() - started
        await calls.close()
        return {"accepted": len(latencies), "failures": failures, "accepted_per_s": len(latencies) / seconds}

    def smtp_credential(self, key: str) -> tuple[str, str]:
        from postmesh.identity.v1 import smtp_credentials_pb2

        with Client(self.address, key) as client:
            created = client.identity.CreateSmtpCredential(
                smtp_credentials_pb2.CreateSmtpCredentialRequest(description="bench")
            )
        return created.credential.username, created.password

    async def run_smtp(self, username: str, password: str, connections: int) -> dict[str, float]:
        """The same messages over SMTP: `connections` sessions (STARTTLS, AUTH PLAIN once each), every
        message a MAIL/RCPT/DATA answered `250 Ok <MessageId>`. Accepted/s is measured at the client."""
        import ssl

        import aiosmtplib

        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE  # the bench's self-signed certificate

        def message(n: int) -> EmailMessage:
            mime = EmailMessage()
            mime["From"] = "Bench <news@bench.test>"
            mime["To"] = f"user{n}@sink.test"
            mime["Subject"] = f"SMTP benchmark {n}"
            mime.set_content(BODY)
            return mime

        accepted = 0
        failures = 0

        async def session(numbers: range) -> None:
            nonlocal accepted, failures
            client = aiosmtplib.SMTP(
                hostname="127.0.0.1", port=self.smtp_port, start_tls=True, tls_context=context, timeout=60
            )
            async with client:
                await client.login(username, password)
                for n in numbers:
                    try:
                        await client.send_message(message(n))
                        accepted += 1
                    except aiosmtplib.SMTPException:
                        failures += 1

        # Warm-up: the credential, the sender checks and the signing key are then cached.
        await session(range(0, 10))
        accepted, failures = 0, 0
        total = self.messages
        started = time.perf_counter()
        await asyncio.gather(*(session(range(i, total, connections)) for i in range(connections)))
        seconds = time.perf_counter() - started
        return {"accepted": accepted, "failures": failures, "accepted_per_s": accepted / seconds}


@dataclass
class Measured:
    """What one shape of the mesh measured."""

    shape: Shape
    loop: str  # the event loop its processes ran
    bits: int
    burst: dict[str, Any]
    smtp: dict[str, float]
    open_loop: dict[str, float] | None
    rss: dict[str, float]

    @property
    def largest_postmesh_rss(self) -> float:
        return max((mb for name, mb in self.rss.items() if name.startswith("postmesh")), default=math.nan)


def _measure_shape(
    workdir: Path, shape: Shape, args: argparse.Namespace, *, peer_wanted: bool
) -> tuple[Measured, dict[str, Any] | None]:
    """One mesh of `shape`: the burst and the queue, SMTP, (the Postfix peer on its sink when
    `peer_wanted`), then the open loop; the peak RSS of its processes."""
    bench = _bench(workdir, shape, args, profile=args.profile or "")
    peer = None
    try:
        bench.start()
        account_id, key, bits = bench.set_up_account()
        burst = _run(bench.run(account_id, key))
        smtp = _run(bench.run_smtp(*bench.smtp_credential(key), args.smtp_connections))
        if peer_wanted:
            # Measured while this mesh idles, before the open loop leaves it deliveries to finish.
            peer = bench.run_postfix_peer()
        open_loop = (
            _run(bench.run_open_loop(key, args.offered_rate, args.offered_seconds))
            if args.offered_rate
            else None
        )
        rss = bench.peak_rss()
    finally:
        bench.stop()
        if args.log:
            with open(args.log, "ab") as kept:
                kept.write((workdir / "postmesh.log").read_bytes())
    return Measured(shape, _resolved_loop(shape.loop), bits, burst, smtp, open_loop, rss), peer


def _bench(
    workdir: Path,
    shape: Shape,
    args: argparse.Namespace,
    *,
    delivery_processes: int | None = None,
    profile: str = "",
    extra_env: dict[str, str] | None = None,
) -> Bench:
    """A Bench of `shape` with the command line's settings."""
    return Bench(
        workdir,
        args.messages,
        args.concurrency,
        args.delivery_processes if delivery_processes is None else delivery_processes,
        serve_processes=shape.processes,
        event_loop=shape.loop,
        log_level=args.log_level,
        profile=profile,
        sandbox=args.sandbox,
        extra_env=extra_env or {},
    )


def _resolved_loop(loop: str) -> str:
    """The loop the mesh runs on when the bench sets EVENT_LOOP to `loop` ('': it does not)."""
    return eventloop.resolve(loop or os.environ.get("EVENT_LOOP") or "auto")


def _queued_pass(workdir: Path, shape: Shape, args: argparse.Namespace) -> dict[str, Any]:
    """A mesh whose delivery workers are off (DELIVERY_WORKERS=0: `serve all` only accepts), so that
    every message accepted stays queued in JetStream: the peak RSS of each process once `--queued`
    messages wait there."""
    bench = _bench(workdir, shape, args, delivery_processes=0, extra_env={"DELIVERY_WORKERS": "0"})
    try:
        bench.start()
        _, key, _ = bench.set_up_account()
        accepted = _run(bench.run_accept_only(key, args.queued))
        return {**accepted, "rss": bench.peak_rss()}
    finally:
        bench.stop()


def _virus_scan_pass(
    workdir: Path, args: argparse.Namespace, shape: Shape, clamd_binary: str
) -> dict[str, Any]:
    """The end-to-end burst again, on a fresh mesh whose delivery workers scan each message with a
    local clamd (the EICAR database only: the scan cost is clamd's parsing of the message, not the
    size of a real signature set, which adds clamd memory more than time per message)."""
    clamd = ClamdProcess(workdir / "clamd", binary=clamd_binary).start()
    bench = _bench(workdir / "scanned", shape, args, extra_env={"CLAMD_URL": clamd.url})
    try:
        bench.start()
        account_id, key, _ = bench.set_up_account()
        return _run(bench.run(account_id, key, drain=False))
    finally:
        bench.stop()
        clamd.stop()


def _table(measured: list[Measured], peer: dict[str, Any], args: argparse.Namespace) -> str:
    with_loop = len({m.shape.loop for m in measured}) > 1
    postfix = float(peer.get("relayed_per_s") or 0.0)
    header = ["measure", *(m.shape.label(with_loop) for m in measured), "target"]

    def row(name: str, target: str, cell: Any) -> list[str]:
        return [name, *(cell(m) for m in measured), target]

    rows = [
        row(
            "accepted, SendEmail over gRPC",
            report.rate(TARGET_ACCEPTED),
            lambda m: report.rate(m.burst["accepted_per_s"]),
        ),
        row(
            f"accepted, SMTP ({args.smtp_connections} connections)",
            "",
            lambda m: report.rate(m.smtp["accepted_per_s"]),
        ),
        row(
            "delivered end to end",
            report.rate(TARGET_DELIVERED),
            lambda m: report.rate(m.burst["delivered_per_s"]),
        ),
        row(
            "delivered from the queue alone",
            report.rate(TARGET_DELIVERED),
            lambda m: report.rate(m.burst["drained_per_s"]),
        ),
    ]
    if postfix:
        rows += [
            row(
                f"end to end / Postfix+OpenDKIM ({postfix:,.0f}/s)",
                f">= {TARGET_RATIO:.0f}x",
                lambda m: report.ratio(m.burst["delivered_per_s"], postfix),
            ),
            row(
                "from the queue / Postfix+OpenDKIM",
                "",
                lambda m: report.ratio(m.burst["drained_per_s"], postfix),
            ),
        ]
    rows += [
        row(
            "CPU per message, all postmesh processes",
            f"<= {TARGET_CPU_MS} ms",
            lambda m: report.ms(m.burst["cpu_ms_per_message"]),
        ),
        row(
            f"accept latency p50 / p99 ({args.concurrency} in flight)",
            "",
            lambda m: f"{report.ms(m.burst['p50_ms'])} / {report.ms(m.burst['p99_ms'])}",
        ),
    ]
    if args.offered_rate:
        offered = f"{args.offered_rate:,.0f}/s offered"
        rows += [
            row(
                f"open loop, {offered}: accepted",
                "",
                lambda m: report.rate(m.open_loop["accepted_per_s"]) if m.open_loop else "",
            ),
            row(
                f"open loop, {offered}: p50 / p99",
                f"p99 < {TARGET_OPEN_LOOP_P99_MS:.0f} ms",
                lambda m: (
                    f"{report.ms(m.open_loop['p50_ms'])} / {report.ms(m.open_loop['p99_ms'])}"
                    if m.open_loop
                    else ""
                ),
            ),
        ]
    rows.append(
        row(
            "peak RSS, largest postmesh process",
            f"< {TARGET_RSS_MB:.0f} MB",
            lambda m: report.mb(m.largest_postmesh_rss),
        )
    )
    return report.markdown_table(header, rows)


def _verdicts(m: Measured, postfix: float, args: argparse.Namespace) -> list[str]:
    """The goals of issue 11 this shape misses."""
    missed = []
    if postfix and m.burst["delivered_per_s"] < TARGET_RATIO * postfix:
        missed.append(
            f"end to end {m.burst['delivered_per_s'] / postfix:.1f}x Postfix (goal {TARGET_RATIO:.0f}x)"
        )
    if not m.burst["cpu_ms_per_message"] <= TARGET_CPU_MS:
        missed.append(f"CPU {m.burst['cpu_ms_per_message']:.1f} ms per message (goal {TARGET_CPU_MS} ms)")
    if m.open_loop and not m.open_loop["p99_ms"] < TARGET_OPEN_LOOP_P99_MS:
        missed.append(
            f"p99 {m.open_loop['p99_ms']:,.0f} ms at {args.offered_rate:,.0f}/s offered "
            f"(goal < {TARGET_OPEN_LOOP_P99_MS:.0f} ms)"
        )
    if not m.largest_postmesh_rss < TARGET_RSS_MB:
        missed.append(f"peak RSS {m.largest_postmesh_rss:,.0f} MB")
    return missed


def _print_report(
    measured: list[Measured],
    peer: dict[str, Any],
    queued: dict[str, Any] | None,
    scanned: dict[str, Any] | None,
    args: argparse.Namespace,
    wall: float,
) -> None:
    first = measured[0]
    loops = ", ".join(sorted({m.loop for m in measured}))
    deliverers = (
        f"{args.delivery_processes} delivery replica(s)" if args.delivery_processes else "`serve all` itself"
    )
    print(
        f"\npostmesh bench: {args.messages} messages of ~5 KB per burst, {args.concurrency} SendEmail "
        f"calls in flight, DKIM RSA-{first.bits} signed, delivered by SMTP to a local sink by {deliverers}; "
        f"event loop {loops}; {os.cpu_count()} CPUs, {wall:.0f} s in all.\n"
    )
    print(_table(measured, peer, args))
    postfix = float(peer.get("relayed_per_s") or 0.0)
    if postfix:
        print(
            f"\nPostfix + OpenDKIM (same key, same sink, SMTP on {min(args.concurrency, 64)} connections, "
            f"measured once in this run): {int(peer['relayed'])} relayed, {postfix:,.0f} msg/s, "
            f"{peer['cpu_seconds'] * 1000 / max(peer['relayed'], 1):.2f} ms CPU per message."
        )
    else:
        print(f"\nPostfix + OpenDKIM not measured ({peer.get('skipped')}): no ratio.")
    if scanned:
        print(
            f"With clamd scanning each message ({first.shape.label(False)}): "
            f"{report.rate(scanned['delivered_per_s'])} end to end, "
            f"{scanned['delivered_per_s'] / first.burst['delivered_per_s']:.0%} of the same without one."
        )
    for m in measured:
        label = m.shape.label(True).replace("default loop", m.loop)
        print(f"\n{label}:")
        for phase, cpu, seconds in (
            ("accepting", m.burst["cpu"], m.burst["accept_seconds"]),
            ("delivering from the queue", m.burst["drain_cpu"], m.burst["drain_seconds"]),
        ):
            print(
                f"  CPU while {phase} ({seconds:.1f} s): "
                + ", ".join(f"{name} {used:.1f} s" for name, used in cpu.items())
                + f"; {sum(cpu.values()) / seconds:.0%} of one CPU in all."
            )
        print("  peak RSS: " + ", ".join(f"{name} {report.mb(v)}" for name, v in m.rss.items()) + ".")
        counts = (
            f"  {int(m.burst['accepted'])} accepted, {int(m.burst['failures'])} refused, "
            f"{int(m.burst['delivered'])} delivered; {args.messages} put straight on the queue "
            f"({report.rate(m.burst['enqueued_per_s'])}), {int(m.burst['drained'])} delivered from it; "
            f"{int(m.smtp['accepted'])} accepted over SMTP, {int(m.smtp['failures'])} refused"
        )
        if m.open_loop:
            counts += (
                f"; open loop: {int(m.open_loop['accepted'])} accepted, "
                f"{int(m.open_loop['failures'])} failed (refused, or no answer within 30 s), "
                f"offered {report.rate(m.open_loop['achieved_per_s'])} (the bench client's pace)"
            )
        print(counts + f". Other events: {m.burst['other_events'] or 'none'}.")
        missed = _verdicts(m, postfix, args)
        print("  Goals of issue 11: " + ("all met." if not missed else "missed: " + "; ".join(missed) + "."))
    if queued:
        rss = queued["rss"]
        worst = max((v for k, v in rss.items() if k.startswith("postmesh")), default=math.nan)
        print(
            f"\n{int(queued['accepted'])} messages accepted and left queued (delivery off, "
            "DELIVERY_WORKERS=0; "
            f"`serve all` in {queued['processes']} process(es)) at {report.rate(queued['accepted_per_s'])}, "
            f"{int(queued['failures'])} refused. Peak RSS: "
            + ", ".join(f"{name} {report.mb(v)}" for name, v in rss.items())
            + f"; largest postmesh process {report.mb(worst)} "
            + ("(under" if worst < TARGET_RSS_MB else "(over")
            + f" the {TARGET_RSS_MB:.0f} MB goal)."
        )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else "")
    parser.add_argument("--messages", type=int, default=1000, help="messages in each measured burst")
    parser.add_argument("--concurrency", type=int, default=64, help="SendEmail calls in flight")
    parser.add_argument(
        "--delivery-processes",
        type=int,
        default=0,
        help="delivery-only `postmesh serve sender` replicas (0: `serve all` delivers itself)",
    )
    parser.add_argument(
        "--processes",
        type=report.parse_counts,
        default=[1, 2],
        help="worker processes of `serve all` (SERVE_PROCESSES), a column each: 1,2 (default); "
        "0: one per core",
    )
    parser.add_argument(
        "--event-loop",
        type=lambda text: [part for part in text.split(",") if part],
        default=[""],
        help="EVENT_LOOP of the mesh, a column each: asyncio,uvloop (default: as the environment says)",
    )
    parser.add_argument(
        "--offered-rate",
        type=float,
        default=500.0,
        help="the open-loop phase's offered SendEmail rate, msg/s (0: no open-loop phase)",
    )
    parser.add_argument("--offered-seconds", type=float, default=5.0, help="how long the open loop offers")
    parser.add_argument(
        "--queued",
        type=int,
        default=5000,
        help="messages accepted with delivery off, for the peak RSS with them queued (0: skip; the goal "
        "is stated at 100000, about 7 minutes here)",
    )
    parser.add_argument(
        "--sandbox", action="store_true", help="keep the account in the sandbox (recipients checked)"
    )
    parser.add_argument("--smtp-connections", type=int, default=20, help="SMTP sessions in parallel")
    parser.add_argument("--log-level", default="WARNING", help="LOG_LEVEL of the postmesh processes")
    parser.add_argument("--log", help="keep the postmesh processes' log in this file")
    parser.add_argument("--profile", help="record a py-spy profile (raw) of `serve all` in this file")
    parser.add_argument(
        "--no-postfix", action="store_true", help="skip the Postfix + OpenDKIM peer measured in the same run"
    )
    parser.add_argument(
        "--no-virus-scan",
        action="store_true",
        help="skip the second pass with clamd scanning every message (run when clamd is installed)",
    )
    parser.add_argument("--sink", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--sink-count", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.sink:
        proc.sink_main(args.sink, args.sink_count)
        return 0
    for loop in args.event_loop:
        _resolved_loop(loop)  # an unknown or missing loop: said now, not after a mesh ran
    cores = len(os.sched_getaffinity(0))
    shapes = [Shape(n or cores, loop) for loop in args.event_loop for n in args.processes]

    def out_of_time(*_: object) -> None:
        raise TimeoutError("the bench ran out of its time budget")

    clamd_binary = None if args.no_virus_scan else find_binary("clamd")
    budget = 60 + SECONDS_PER_MESH * len(shapes) + (VIRUS_SCAN_SECONDS if clamd_binary else 0)
    budget += (SECONDS_PER_MESH + args.queued // 50) if args.queued else 0
    signal.signal(signal.SIGALRM, out_of_time)
    # The processes it started are still stopped (the `finally`s of each pass).
    signal.alarm(budget)
    wall = time.monotonic()
    measured: list[Measured] = []
    peer: dict[str, Any] = {"skipped": "--no-postfix"}
    queued = scanned = None
    try:
        with tempfile.TemporaryDirectory(prefix="postmesh-bench-") as workdir:
            if args.log:
                Path(args.log).write_bytes(b"")
            for n, shape in enumerate(shapes):
                result, measured_peer = _measure_shape(
                    Path(workdir) / f"mesh{n}", shape, args, peer_wanted=n == 0 and not args.no_postfix
                )
                measured.append(result)
                peer = measured_peer or peer
            if args.queued:
                largest = max(shapes, key=lambda s: s.processes)
                queued = {
                    **_queued_pass(Path(workdir) / "queued", largest, args),
                    "processes": largest.processes,
                }
            if clamd_binary:
                scanned = _virus_scan_pass(Path(workdir), args, shapes[0], clamd_binary)
    finally:
        signal.alarm(0)
    _print_report(measured, peer, queued, scanned, args, time.monotonic() - wall)
    return 0


if __name__ == "__main__":
    sys.exit(main())
