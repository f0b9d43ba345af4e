"""`make bench`: how fast postmesh accepts and delivers, against the targets and Postfix+opendkim.

Everything runs on this machine, on loopback: a nats-server, a DNS server (identities verify through
it), an SMTP sink in a process of its own, and `postmesh serve all` in another. An account verifies
its sending domain (Easy DKIM, RSA-2048) and the sink's domain, then SendEmail is called from many
concurrent gRPC calls. Accepted/s is measured at the client; delivered/s from the first call to
the last Delivery event (the sink's 250 to a DKIM-signed message). Peak RSS is each process's VmHWM.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import collections
import datetime as dt
import os
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from email.message import EmailMessage
from email.utils import format_datetime
from pathlib import Path
from typing import Any

import grpc
import nats
from grpc import aio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from postmesh.client import Client
from postmesh.common.natsserver import NatsServerProcess, free_port
from postmesh.common.outbound import enqueue
from postmesh.common.streams import EMAIL_EVENTS_SUBJECT, EVENTS
from postmesh.events.v1 import events_pb2
from postmesh.identity.v1 import identity_pb2
from postmesh.quota.v1 import quota_pb2
from postmesh.sender.v1 import queue_pb2, sender_pb2, sender_pb2_grpc
from postmesh.testing_scanners import ClamdProcess, find_binary

TARGET_ACCEPTED = 1000.0
TARGET_DELIVERED = 500.0
TARGET_RSS_MB = 300.0
# The whole bench stays under two minutes: each wait for deliveries is bounded, and so is the run.
DELIVERY_WAIT_SECONDS = 30.0
BENCH_SECONDS = 110
# End to end against Postfix + OpenDKIM measured in the same run (postmesh.benchpeer).
TARGET_RATIO = 3.0
TARGET_CPU_MS = 1.5  # CPU per message over every postmesh process, accept and delivery together
# The second pass with clamd scanning every message (when clamav-daemon is installed).
VIRUS_SCAN_SECONDS = 70
BODY = ("postmesh benchmark message body. " * 150)[:4800]  # ~5 KB, as the Postfix figure used


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


def _peak_rss_mb(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def _workers_of(pid: int) -> list[int]:
    """The worker processes of a `postmesh serve all` supervisor (none when it runs alone)."""
    try:
        return [int(child) for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def _cpu_seconds_of_serve(pid: int) -> float:
    """CPU of `serve all`: itself, its live workers, and the workers it already reaped."""
    return _cpu_seconds(pid, with_children=True) + sum(_cpu_seconds(child) for child in _workers_of(pid))


def _peak_rss_of_serve(pid: int) -> float:
    """The largest peak RSS of one process of `serve all` (a worker's, when it has workers)."""
    return max([_peak_rss_mb(pid), *(_peak_rss_mb(child) for child in _workers_of(pid))])


def _wait_workers(pid: int, processes: int, address: str, deadline: float) -> None:
    """Every worker of `serve all` started and SERVING: health asked on fresh connections, which the
    kernel spreads over the workers."""
    while len(_workers_of(pid)) < processes:
        if time.monotonic() > deadline:
            raise TimeoutError("postmesh serve all did not start its workers")
        time.sleep(0.2)
    for _ in range(8 * processes):
        channel = grpc.insecure_channel(address, options=[("grpc.use_local_subchannel_pool", 1)])
        try:
            health = health_pb2_grpc.HealthStub(channel)
            while True:
                try:
                    reply = health.Check(health_pb2.HealthCheckRequest(), timeout=2)
                    if reply.status == health_pb2.HealthCheckResponse.SERVING:
                        break
                except grpc.RpcError:
                    pass
                if time.monotonic() > deadline:
                    raise TimeoutError("a worker of postmesh serve all did not become SERVING")
                time.sleep(0.2)
        finally:
            channel.close()


def _cpu_seconds(pid: int, *, with_children: bool = False) -> float:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except OSError:
        return float("nan")
    ticks = int(fields[11]) + int(fields[12])
    if with_children:
        ticks += int(fields[13]) + int(fields[14])
    return ticks / os.sysconf("SC_CLK_TCK")


def _sink_main(port: int, count_file: str) -> None:
    """The receiving end: an aiosmtpd server that takes every message (a process of its own), and
    writes how many it took to `count_file` (what the Postfix peer's rate is read from)."""
    from aiosmtpd.controller import Controller

    received = 0

    class Accept:
        async def handle_DATA(self, server: object, session: object, envelope: object) -> str:
            nonlocal received
            received += 1
            return "250 2.0.0 OK"

    controller = Controller(Accept(), hostname="127.0.0.1", port=port)
    controller.start()
    print("ready", flush=True)
    stop = False

    def on_term(*_: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, on_term)
    counter = Path(count_file)
    while not stop:
        counter.write_text(str(received))
        time.sleep(0.02)
    controller.stop()


def _sink_count(count_file: Path) -> int:
    try:
        return int(count_file.read_text() or 0)
    except (OSError, ValueError):
        return 0


def _wait_serving(address: str, deadline: float) -> None:
    with Client(address) as client:
        while True:
            try:
                if client.health_status("", timeout=2) == "SERVING":
                    return
            except grpc.RpcError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError("postmesh did not become SERVING")
            time.sleep(0.2)


class Bench:
    def __init__(
        self,
        workdir: Path,
        messages: int,
        concurrency: int,
        delivery_processes: int,
        *,
        serve_processes: int = 1,
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
        self.processes: list[subprocess.Popen[bytes]] = []
        self.deliverers: list[subprocess.Popen[bytes]] = []

    def start(self) -> None:
        from postmesh.testing import LOOPBACK_PROCESS_ENV
        from postmesh.testing_mail import LoopbackDns

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
            **self.extra_env,
        }
        log = (self.workdir / "postmesh.log").open("wb")
        self.mesh = subprocess.Popen(
            [sys.executable, "-m", "postmesh.cli.main", "serve", "all"], env=env, stdout=log, stderr=log
        )
        self.processes.append(self.mesh)
        _wait_serving(self.address, time.monotonic() + 60)
        if self.serve_processes > 1:
            _wait_workers(self.mesh.pid, self.serve_processes, self.address, time.monotonic() + 90)
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
            _wait_serving(f"127.0.0.1:{port}", time.monotonic() + 60)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def cpu_seconds(self) -> dict[str, float]:
        """CPU time used so far by each process of the bench (user + system)."""
        named = {
            "postmesh serve all": self.mesh.pid,
            **{f"postmesh serve sender #{n + 1}": p.pid for n, p in enumerate(self.deliverers)},
            "SMTP sink": self.sink.pid,
        }
        if self.nats.process is not None:
            named["nats-server"] = self.nats.process.pid
        seconds = {name: _cpu_seconds(pid) for name, pid in named.items()}
        seconds["postmesh serve all"] = _cpu_seconds_of_serve(self.mesh.pid)
        seconds["bench client (this)"] = time.process_time()
        return seconds

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
            before = _sink_count(self.sink_count)
            warm = [benchpeer.bench_message(n, BODY, "bench.test") for n in range(40)]
            asyncio.run(benchpeer.submit(peer.port, warm, 8, "news@bench.test"))
            _wait_count(self.sink_count, before + len(warm), DELIVERY_WAIT_SECONDS)
            messages = [benchpeer.bench_message(n, BODY, "bench.test") for n in range(self.messages)]
            before = _sink_count(self.sink_count)
            cpu_before = _cpu_seconds_of_tree(peer)
            started = time.perf_counter()
            taken = asyncio.run(
                benchpeer.submit(peer.port, messages, min(self.concurrency, 64), "news@bench.test")
            )
            arrived, finished = _wait_count(self.sink_count, before + taken, DELIVERY_WAIT_SECONDS)
            seconds = finished - started
            return {
                "relayed": arrived - before,
                "relayed_per_s": (arrived - before) / seconds if seconds > 0 else 0.0,
                "cpu_seconds": _cpu_seconds_of_tree(peer) - cpu_before,
            }
        except Exception as exc:  # the peer failed to run: say why, keep postmesh's figures
            return {"skipped": f"{exc}; {peer.log_tail()[-400:]}"}
        finally:
            peer.stop()

    async def run(self, account_id: str, key: str, *, drain: bool = True) -> dict[str, Any]:
        nc = await nats.connect(self.nats.url)
        js = nc.jetstream()
        deliveries = await js.pull_subscribe(
            EMAIL_EVENTS_SUBJECT,
            stream=EVENTS.name,
            config=ConsumerConfig(deliver_policy=DeliverPolicy.NEW, ack_policy=AckPolicy.NONE),
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
                for msg in batch:
                    event = events_pb2.Event.FromString(msg.data)
                    if event.account_id != account_id:
                        continue
                    kinds[events_pb2.EmailEventType.Name(event.email.event_type)] += 1
                    if event.email.event_type == events_pb2.EMAIL_EVENT_TYPE_DELIVERY:
                        delivered += 1
                        last_delivery = time.perf_counter()

        # Connections of their own (gRPC shares one between channels of the same target otherwise), so
        # that the kernel spreads them over the workers of `serve all`, as it does many clients'.
        channels = [
            aio.insecure_channel(self.address, options=[("grpc.use_local_subchannel_pool", 1)])
            for _ in range(8)
        ]
        stubs = [sender_pb2_grpc.SenderServiceStub(c) for c in channels]
        metadata = (("authorization", f"Bearer {key}"),)

        def request(n: int) -> sender_pb2.SendEmailRequest:
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

        latencies: list[float] = []
        failures = 0

        async def send(numbers: range) -> None:
            nonlocal failures
            for n in numbers:
                started = time.perf_counter()
                try:
                    await stubs[n % len(stubs)].SendEmail(request(n), metadata=metadata, timeout=30)
                except aio.AioRpcError:
                    failures += 1
                    continue
                latencies.append(time.perf_counter() - started)

        # Warm-up: connections, caches, the signing key.
        await asyncio.gather(*(send(range(i, 40, 8)) for i in range(8)))
        await count_deliveries(40 - failures)
        delivered, latencies, failures = 0, [], 0

        total = self.messages
        counter = asyncio.create_task(count_deliveries(total))
        cpu_before = self.cpu_seconds()
        started = time.perf_counter()
        await asyncio.gather(*(send(range(i, total, self.concurrency)) for i in range(self.concurrency)))
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
            await asyncio.wait_for(counter, timeout=DELIVERY_WAIT_SECONDS)
        except TimeoutError:
            pass
        drained = delivered - delivered_before
        drain_seconds = (last_delivery - started) if drain else 0.0
        drain_cpu = {name: seconds - cpu_before[name] for name, seconds in self.cpu_seconds().items()}
        for channel in channels:
            await channel.close()
        await nc.close()
        latencies.sort()
        return {
            "accepted": len(latencies),
            "failures": failures,
            "accepted_per_s": len(latencies) / accept_seconds,
            "p50_ms": statistics.median(latencies) * 1000 if latencies else float("nan"),
            "p99_ms": latencies[int(len(latencies) * 0.99) - 1] * 1000 if latencies else float("nan"),
            "delivered_per_s": delivered_before / deliver_seconds if deliver_seconds > 0 else 0.0,
            "delivered": delivered_before,
            "enqueued_per_s": total / enqueue_seconds,
            "drained": drained,
            "drained_per_s": drained / drain_seconds if drain_seconds > 0 else 0.0,
            "cpu": cpu,
            "cpu_ms_per_message": e2e_cpu * 1000 / delivered_before if delivered_before else float("nan"),
            "drain_cpu": drain_cpu,
            "drain_seconds": drain_seconds or float("nan"),
            "accept_seconds": accept_seconds,
            "other_events": ", ".join(
                f"{n} {k.removeprefix('EMAIL_EVENT_TYPE_').lower()}"
                for k, n in sorted(kinds.items())
                if k != "EMAIL_EVENT_TYPE_DELIVERY"
            ),
        }

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


def _wait_count(count_file: Path, wanted: int, within: float) -> tuple[int, float]:
    """Waits until the sink has taken `wanted` messages (or `within` passes): (count, when it last grew)."""
    deadline = time.perf_counter() + within
    count, grew = _sink_count(count_file), time.perf_counter()
    while count < wanted and time.perf_counter() < deadline:
        time.sleep(0.02)
        now = _sink_count(count_file)
        if now != count:
            count, grew = now, time.perf_counter()
    return count, grew


def _cpu_seconds_of_tree(peer: Any) -> float:
    """CPU used by the Postfix peer's processes (master and its children) and opendkim."""
    total = 0.0
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes()
        except OSError:
            continue
        if str(peer.dir).encode() in cmdline or _in_instance(proc, peer):
            # With the children it already reaped (postfix's master reaps its daemons).
            total += _cpu_seconds(int(proc.name), with_children=True)
    return total


def _in_instance(proc: Path, peer: Any) -> bool:
    try:
        environ = (proc / "environ").read_bytes()
    except OSError:
        return False
    return str(peer.dir).encode() in environ


def _virus_scan_pass(workdir: Path, args: argparse.Namespace, clamd_binary: str) -> dict[str, Any]:
    """The end-to-end burst again, on a fresh mesh whose delivery workers scan each message with a
    local clamd (the EICAR database only: the scan cost is clamd's parsing of the message, not the
    size of a real signature set, which adds clamd memory more than time per message)."""
    clamd = ClamdProcess(workdir / "clamd", binary=clamd_binary).start()
    bench = Bench(
        workdir / "scanned",
        args.messages,
        args.concurrency,
        args.delivery_processes,
        log_level=args.log_level,
        sandbox=args.sandbox,
        extra_env={"CLAMD_URL": clamd.url},
    )
    try:
        bench.workdir.mkdir()
        bench.start()
        account_id, key, _ = bench.set_up_account()
        return asyncio.run(bench.run(account_id, key, drain=False))
    finally:
        bench.stop()
        clamd.stop()


def _row(name: str, value: str, target: str, verdict: str) -> str:
    return f"| {name:<36} | {value:>14} | {target:>16} | {verdict:<8} |"


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
        type=int,
        default=0,
        help="worker processes of `serve all` (SERVE_PROCESSES; 0: one per core, as `make run`)",
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
        _sink_main(args.sink, args.sink_count)
        return 0

    def out_of_time(*_: object) -> None:
        raise TimeoutError(f"the bench did not finish within {BENCH_SECONDS} s")

    signal.signal(signal.SIGALRM, out_of_time)
    clamd_binary = None if args.no_virus_scan else find_binary("clamd")
    # The processes it started are still stopped (finally below).
    signal.alarm(BENCH_SECONDS + (VIRUS_SCAN_SECONDS if clamd_binary else 0))
    with tempfile.TemporaryDirectory(prefix="postmesh-bench-") as workdir:
        bench = Bench(
            Path(workdir),
            args.messages,
            args.concurrency,
            args.delivery_processes,
            serve_processes=args.processes or len(os.sched_getaffinity(0)),
            log_level=args.log_level,
            profile=args.profile or "",
            sandbox=args.sandbox,
        )
        wall = time.monotonic()
        try:
            bench.start()
            account_id, key, bits = bench.set_up_account()
            result = asyncio.run(bench.run(account_id, key))
            smtp_result = asyncio.run(bench.run_smtp(*bench.smtp_credential(key), args.smtp_connections))
            peer: dict[str, Any] = (
                {"skipped": "--no-postfix"} if args.no_postfix else bench.run_postfix_peer()
            )
            rss = {
                "postmesh serve all": _peak_rss_of_serve(bench.mesh.pid),
                **{
                    f"postmesh serve sender #{n + 1}": _peak_rss_mb(p.pid)
                    for n, p in enumerate(bench.deliverers)
                },
                "SMTP sink (aiosmtpd)": _peak_rss_mb(bench.sink.pid),
                "nats-server": _peak_rss_mb(bench.nats.process.pid) if bench.nats.process else float("nan"),
            }
        finally:
            if not clamd_binary:
                signal.alarm(0)
            bench.stop()
            if args.log:
                shutil.copy(Path(workdir) / "postmesh.log", args.log)
        scanned = None
        if clamd_binary:
            try:
                scanned = _virus_scan_pass(Path(workdir), args, clamd_binary)
            finally:
                signal.alarm(0)
    ok = "ok"
    print(
        f"\npostmesh bench: {args.messages} messages of ~5 KB, {args.concurrency} SendEmail calls in flight, "
        f"`serve all` in {bench.serve_processes} worker process(es), "
        f"DKIM RSA-{bits} signed, delivered by SMTP to a local sink by "
        f"{args.delivery_processes or 'the same'} process(es); {os.cpu_count()} CPUs, "
        f"{time.monotonic() - wall:.0f} s in all.\n"
    )
    accepted, delivered, drained = (
        result["accepted_per_s"],
        result["delivered_per_s"],
        result["drained_per_s"],
    )
    rows = [
        ("measure", "postmesh", "target", "verdict"),
        ("-" * 36, "-" * 14, "-" * 16, "-" * 8),
        (
            "accepted (SendEmail over gRPC)",
            f"{accepted:,.0f} msg/s",
            f"{TARGET_ACCEPTED:,.0f} msg/s",
            ok if accepted >= TARGET_ACCEPTED else "below",
        ),
        (
            f"accepted (SMTP, {args.smtp_connections} connections)",
            f"{smtp_result['accepted_per_s']:,.0f} msg/s",
            f"gRPC {accepted:,.0f} msg/s",
            "",
        ),
        (
            "delivered end to end (SendEmail)",
            f"{delivered:,.0f} msg/s",
            f"{TARGET_DELIVERED:,.0f} msg/s",
            ok if delivered >= TARGET_DELIVERED else "below",
        ),
        (
            "delivered from the queue alone",
            f"{drained:,.0f} msg/s",
            f"{TARGET_DELIVERED:,.0f} msg/s",
            ok if drained >= TARGET_DELIVERED else "below",
        ),
        *(
            [
                (
                    "Postfix + OpenDKIM, this run",
                    f"{peer['relayed_per_s']:,.0f} msg/s",
                    "(the peer)",
                    "",
                ),
                (
                    "  postmesh / Postfix end to end",
                    f"{delivered / peer['relayed_per_s']:.2f}x",
                    f">= {TARGET_RATIO:.0f}x",
                    ok if delivered >= TARGET_RATIO * peer["relayed_per_s"] else "below",
                ),
                (
                    "  postmesh / Postfix from the queue",
                    f"{drained / peer['relayed_per_s']:.2f}x",
                    "",
                    "",
                ),
            ]
            if peer.get("relayed_per_s")
            else []
        ),
        (
            "CPU per message, all postmesh",
            f"{result['cpu_ms_per_message']:.2f} ms",
            f"<= {TARGET_CPU_MS:.1f} ms",
            ok if result["cpu_ms_per_message"] <= TARGET_CPU_MS else "above",
        ),
        *(
            [
                (
                    "  end to end, clamd scanning each",
                    f"{scanned['delivered_per_s']:,.0f} msg/s",
                    "(scanner on)",
                    f"{scanned['delivered_per_s'] / delivered:.0%}" if delivered else "",
                )
            ]
            if scanned
            else []
        ),
        ("accept latency p50", f"{result['p50_ms']:.1f} ms", "", ""),
        ("accept latency p99", f"{result['p99_ms']:.1f} ms", "", ""),
        *[
            (
                f"peak RSS {name}",
                f"{mb:,.0f} MB",
                f"< {TARGET_RSS_MB:.0f} MB",
                ok if mb < TARGET_RSS_MB else "above",
            )
            for name, mb in rss.items()
        ],
    ]
    for row in rows:
        print(_row(*row))
    print()
    for phase, cpu, seconds in (
        ("accepting", result["cpu"], result["accept_seconds"]),
        ("delivering from the queue", result["drain_cpu"], result["drain_seconds"]),
    ):
        print(
            f"CPU while {phase} ({seconds:.1f} s, {os.cpu_count()} CPUs): "
            + ", ".join(f"{name} {used:.1f} s" for name, used in cpu.items())
            + f"; {sum(cpu.values()) / seconds:.0%} of one CPU in all."
        )
    print(
        f"\n{int(result['accepted'])} accepted, {int(result['failures'])} refused, "
        f"{int(result['delivered'])} delivered; then {args.messages} put straight on the queue "
        f"({result['enqueued_per_s']:,.0f} msg/s), {int(result['drained'])} delivered from it; "
        f"{int(smtp_result['accepted'])} accepted over SMTP, {int(smtp_result['failures'])} refused. "
        f"Other events: {result['other_events'] or 'none'}."
    )
    short = [
        f"{name} {value / target:.0%} of the target"
        for name, value, target in (
            ("accepted", accepted, TARGET_ACCEPTED),
            ("delivered end to end", delivered, TARGET_DELIVERED),
            ("delivered from the queue", drained, TARGET_DELIVERED),
        )
        if value < target
    ]
    if peer.get("relayed_per_s"):
        print(
            f"\nPostfix + OpenDKIM (same key, same sink, SMTP on {min(args.concurrency, 64)} connections): "
            f"{int(peer['relayed'])} relayed, {peer['relayed_per_s']:,.0f} msg/s, "
            f"{peer['cpu_seconds'] * 1000 / max(peer['relayed'], 1):.2f} ms CPU per message."
        )
        versus = (
            f" Postfix + OpenDKIM relayed {peer['relayed_per_s']:.0f} msg/s in this run; postmesh delivers "
            f"{drained / peer['relayed_per_s']:.1f}x that from its queue, "
            f"{delivered / peer['relayed_per_s']:.1f}x end to end."
        )
    else:
        versus = f" Postfix + OpenDKIM not measured ({peer.get('skipped')}): no ratio."
    print(
        "\nWhere we stand: "
        + ("every target met." if not short else "below target: " + "; ".join(short) + ".")
        + versus
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
