"""Fault tests' parts: a mesh of real `postmesh serve` processes that can be killed and restarted, a
burst of SendEmail calls from clients that retry every non-final answer with the same request_id,
and the count of what arrived at the SMTP sink by message id."""

from __future__ import annotations

import collections
import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from postmesh.client import Client, error_details
from postmesh.common.natsserver import free_port
from postmesh.identity.v1 import identity_pb2
from postmesh.sender.v1 import sender_pb2 as pb
from postmesh.testing import LOOPBACK_PROCESS_ENV
from postmesh.testing_mail import Behaviour, LoopbackDns, SmtpServer
from tests.identity_helpers import create_verified_domain

ADMIN_KEY = "faults-admin-key"
MESSAGE_ID_DOMAIN = "mail.faults.test"
# Short, so that the tests' retries land after JetStream's duplicate window has closed.
DUPLICATE_WINDOW = 1.0
CLAIM_SECONDS = 3.0
DELIVERY_WORKERS = 16
# What a client may see during an outage before its final answer: retryable codes only.
RETRYABLE = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED}


def wait_serving(address: str, timeout: float = 90.0) -> None:
    with Client(address) as client:
        assert client.wait_serving(timeout), f"{address} did not become SERVING"


@dataclass
class Mesh:
    """core (identity, quota, feedback), accept (sender without delivery) and deliver (sender's
    delivery workers), each a `postmesh serve` process on a fixed port, so one can be restarted."""

    root: Path
    nats_url: str
    dns: LoopbackDns
    sink: SmtpServer
    extra_env: dict[str, str] = field(default_factory=dict)
    ports: dict[str, int] = field(default_factory=dict)
    processes: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    SERVICES = {"core": "identity quota feedback", "accept": "sender", "deliver": "sender"}

    def __post_init__(self) -> None:
        self.ports = {name: free_port() for name in self.SERVICES}

    def address(self, name: str) -> str:
        return f"127.0.0.1:{self.ports[name]}"

    def env(self, name: str) -> dict[str, str]:
        return {
            **os.environ,
            **LOOPBACK_PROCESS_ENV,
            "GRPC_LISTEN": self.address(name),
            "METRICS_PORT": "0",
            "DATA_DIR": str(self.root / name),
            "NATS_URL": self.nats_url,
            "ADMIN_API_KEY": ADMIN_KEY,
            "SERVICE_API_KEY": "faults-service-key",
            "LOG_LEVEL": "WARNING",
            "DKIM_MASTER_KEYS": "test:" + "A" * 43,
            "IDENTITY_HTTP_LISTEN": "127.0.0.1:0",
            "DNS_RESOLVER": self.dns.address,
            "DNS_CHECK_POLL_SECONDS": "3600",
            "DNS_TIMEOUT_SECONDS": "2",
            "IDENTITY_ENDPOINT": self.address("core"),
            "QUOTA_ENDPOINT": self.address("core"),
            "FEEDBACK_ENDPOINT": self.address("core"),
            "SENDER_ENDPOINT": self.address("accept"),
            "SANDBOX_MAX_SEND_RATE": "1000",
            "SANDBOX_MAX_24_HOUR_SEND": "100000",
            "MESSAGE_ID_DOMAIN": MESSAGE_ID_DOMAIN,
            "NATS_DUPLICATE_WINDOW_SECONDS": str(DUPLICATE_WINDOW),
            "SEND_REQUEST_CLAIM_SECONDS": str(CLAIM_SECONDS),
            "STARTUP_RETRY_MAX_SECONDS": "1",
            "DELIVERY_MODE": "smarthost",
            "SMARTHOST": f"127.0.0.1:{self.sink.port}",
            "SMARTHOST_TLS": "none",
            "DELIVERY_WORKERS": str(DELIVERY_WORKERS) if name == "deliver" else "0",
            "DELIVERY_ACK_WAIT_SECONDS": "4",
            **self.extra_env,
        }

    def start(self, name: str, *, wait: bool = True) -> None:
        log = (self.root / f"{name}.log").open("ab")
        self.processes[name] = subprocess.Popen(
            [sys.executable, "-m", "postmesh.cli.main", "serve", *self.SERVICES[name].split()],
            env=self.env(name),
            stdout=log,
            stderr=log,
        )
        if wait:
            wait_serving(self.address(name))

    def kill(self, name: str) -> None:
        process = self.processes[name]
        os.kill(process.pid, signal.SIGKILL)
        process.wait()

    def stop_all(self) -> None:
        for process in self.processes.values():
            if process.poll() is None:
                process.kill()
                process.wait()

    def sending_account(self, domain: str = "faults.test") -> str:
        """A new account with `domain` verified; returns its API key."""
        with Client(self.address("core"), ADMIN_KEY) as admin:
            reply = admin.identity.CreateAccount(identity_pb2.CreateAccountRequest(name="faults"))
        with Client(self.address("core"), reply.api_key_secret) as client:
            create_verified_domain(client, self.dns, domain)
        return reply.api_key_secret


def request(n: int, domain: str = "faults.test") -> pb.SendEmailRequest:
    return pb.SendEmailRequest(
        from_email_address=f"sender@{domain}",
        destination=pb.Destination(to_addresses=[f"user{n}@{domain}"]),
        content=pb.EmailContent(
            simple=pb.Message(
                subject=pb.Content(data=f"fault burst {n}"), body=pb.Body(text=pb.Content(data=f"body {n}"))
            )
        ),
        request_id=f"fault-burst-{n}",
    )


@dataclass
class Burst:
    """`count` SendEmail calls from `threads` clients; every non-final answer is retried with the same
    request_id, each retry after JetStream's duplicate window, until the answer is final."""

    address: str
    api_key: str
    count: int
    threads: int = 8
    deadline: float = 240.0
    message_ids: dict[int, str] = field(default_factory=dict)
    codes: collections.Counter[grpc.StatusCode] = field(default_factory=collections.Counter)
    reasons: collections.Counter[str] = field(default_factory=collections.Counter)
    final_errors: dict[int, str] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def _one(self, client: Client, n: int) -> None:
        self.send_one(lambda r: client.sender.SendEmail(r, timeout=10), n)

    def send_one(self, send: Callable[[pb.SendEmailRequest], pb.SendEmailResponse], n: int) -> None:
        """Request `n` through `send` until its answer is final; the outcome is recorded here."""
        give_up = time.monotonic() + self.deadline
        while time.monotonic() < give_up:
            try:
                reply = send(request(n))
            except grpc.RpcError as error:
                with self._lock:
                    self.codes[error.code()] += 1
                    self.reasons[error_details(error).reason] += 1
                if error.code() not in RETRYABLE:
                    self.final_errors[n] = f"{error.code().name}: {error.details()}"
                    return
                time.sleep(DUPLICATE_WINDOW + 0.5)
                continue
            with self._lock:
                self.codes[grpc.StatusCode.OK] += 1
                self.message_ids[n] = reply.message_id
            return
        self.final_errors[n] = "no final answer before the deadline"

    def run(self, during: Callable[[Burst], None] | None = None) -> None:
        """Sends the burst; `during` runs beside it (it kills and restarts something)."""
        with Client(self.address, self.api_key) as client, ThreadPoolExecutor(self.threads) as pool:
            futures = [pool.submit(self._one, client, n) for n in range(self.count)]
            if during is not None:
                during(self)
            for future in futures:
                future.result()

    def accepted(self) -> int:
        with self._lock:
            return len(self.message_ids)

    def replay(self) -> dict[int, str]:
        """Every request again, after the duplicate window: the ids first answered, nothing new."""
        time.sleep(DUPLICATE_WINDOW + 0.5)
        again = Burst(self.address, self.api_key, self.count, self.threads, self.deadline)
        again.run()
        assert not again.final_errors, again.final_errors
        return again.message_ids


def wait_for(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def arrivals(sink: SmtpServer) -> collections.Counter[str]:
    """Messages received, by postmesh message id (the local part of the Message-ID header)."""
    counts: collections.Counter[str] = collections.Counter()
    for received in sink.received:
        local, _, domain = received.message_id.strip("<>").partition("@")
        if domain == MESSAGE_ID_DOMAIN:
            counts[local] += 1
    return counts


def assert_delivered_once(
    burst: Burst, sink: SmtpServer, *, settle: float = 8.0, in_hand_at_kill: int = 0
) -> None:
    """Every accepted message arrived, none twice, and nothing arrived that was not accepted.

    `in_hand_at_kill`: how many messages a killed delivery process may have had between the SMTP
    server's 250 and its acknowledgement (SMTP's own window, see docs/reliability.md): those may
    arrive twice."""
    assert not burst.final_errors, burst.final_errors
    assert len(burst.message_ids) == burst.count
    assert len(set(burst.message_ids.values())) == burst.count
    expected = set(burst.message_ids.values())
    try:
        wait_for(lambda: expected <= set(arrivals(sink)), 120, "every accepted message to arrive")
    except AssertionError:
        missing = sorted(expected - set(arrivals(sink)))
        raise AssertionError(f"{len(missing)} accepted messages never arrived: {missing}") from None
    # Long enough for a second copy to show up: past the duplicate window, the claim lease and the
    # delivery workers' ack wait.
    time.sleep(settle)
    counts = arrivals(sink)
    assert set(counts) == expected, set(counts) ^ expected
    duplicates = {mid: c for mid, c in counts.items() if c > 1}
    assert len(duplicates) <= in_hand_at_kill and all(c == 2 for c in duplicates.values()), duplicates


@contextmanager
def running_mesh(root: Path, nats_url: str, extra_env: dict[str, str] | None = None) -> Iterator[Mesh]:
    """The three processes of a Mesh, up and SERVING, with their own DNS server and SMTP sink."""
    with loopback_mail() as (dns, sink):
        mesh = Mesh(root, nats_url, dns, sink, extra_env=extra_env or {})
        try:
            for name in Mesh.SERVICES:
                mesh.start(name)
            yield mesh
        finally:
            mesh.stop_all()


def health(address: str, service: str) -> str:
    """The health status of `service` at `address`, or the error code when it cannot be asked."""
    with Client(address) as client:
        try:
            return client.health_status(service, timeout=5)
        except grpc.RpcError as error:
            return error.code().name


@contextmanager
def loopback_mail() -> Iterator[tuple[LoopbackDns, SmtpServer]]:
    # Offering PIPELINING as real MX hosts do: workers killed mid-transaction take the pipelined path.
    with LoopbackDns() as dns, SmtpServer(behaviour=Behaviour(pipelining=True)) as sink:
        yield dns, sink


class TcpProxy:
    """A TCP proxy on loopback in front of `target` that the test can cut (every connection closed,
    new ones refused) and restore on the same port: a database made unreachable and back."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.port = free_port()
        self._lock = threading.Lock()
        self._sockets: set[socket.socket] = set()
        self._listener: socket.socket | None = None

    def start(self) -> TcpProxy:
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(128)
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()
        return self

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return  # cut
            try:
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError:
                client.close()
                continue
            upstream.settimeout(None)
            with self._lock:
                self._sockets.update((client, upstream))
            for source, sink in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(source, sink), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        for end in (source, sink):
            with contextlib.suppress(OSError):
                end.shutdown(socket.SHUT_RDWR)
            end.close()
        with self._lock:
            self._sockets.difference_update((source, sink))

    def cut(self) -> None:
        if self._listener is not None:
            # shutdown first: close() alone leaves a thread blocked in accept() listening (Linux).
            with contextlib.suppress(OSError):
                self._listener.shutdown(socket.SHUT_RDWR)
            self._listener.close()
            self._listener = None
        with self._lock:
            sockets = list(self._sockets)
        for end in sockets:
            with contextlib.suppress(OSError):
                end.shutdown(socket.SHUT_RDWR)

    def stop(self) -> None:
        self.cut()
