"""The cluster's shape on one machine, as the Helm chart deploys it: two processes of each service and
two delivery-worker processes against one NATS and one PostgreSQL (migrated first by `postmesh
migrate`, as the chart's hook Job does), TLS on every gRPC connection, calls between services balanced
over both replicas. Mail flows through them while one process of each kind is killed with SIGKILL:
every accepted message is delivered."""

from __future__ import annotations

import collections
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from postmesh.client import Client, error_details
from postmesh.common.natsserver import free_port
from postmesh.identity.v1 import identity_pb2
from postmesh.sender.v1 import sender_pb2 as pb
from postmesh.testing import LOOPBACK_PROCESS_ENV
from postmesh.testing_mail import LoopbackDns, SmtpServer
from tests.identity_helpers import create_verified_domain
from tests.sending_helpers import own_nats_server
from tests.tls_helpers import TestCa

SERVICES = ("identity", "quota", "sender", "feedback")
KINDS = (*SERVICES, "delivery")
MESSAGES = 240
SERVER_NAME = "postmesh.test"
ADMIN_KEY = "cluster-admin-key"
SERVICE_KEY = "cluster-service-key"
# Final answers: anything else is retried with the same request_id until it is final.
RETRYABLE = {
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
}


@pytest.fixture
def nats_url(tmp_path: Path) -> Iterator[str]:
    # Delivery workers of their own on the work queue: keep them off the suite's shared server.
    with own_nats_server(tmp_path / "nats") as url:
        yield url


class Cluster:
    def __init__(
        self, tmp_path: Path, nats_url: str, database_url: str, zone: LoopbackDns, sink: SmtpServer
    ) -> None:
        self.tmp_path = tmp_path
        self.ca = TestCa(tmp_path / "ca")
        tls = self.ca.issue("mesh", [SERVER_NAME, "localhost", "127.0.0.1"])
        self.ports = {(kind, n): free_port() for kind in KINDS for n in (0, 1)}
        endpoints = {
            f"{service.upper()}_ENDPOINT": "ipv4:"
            + ",".join(f"127.0.0.1:{self.ports[(service, n)]}" for n in (0, 1))
            for service in SERVICES
        }
        self.env = {
            **os.environ,
            **LOOPBACK_PROCESS_ENV,
            **endpoints,
            "NATS_URL": nats_url,
            "DATABASE_URL": database_url,
            "ADMIN_API_KEY": ADMIN_KEY,
            "SERVICE_API_KEY": SERVICE_KEY,
            "METRICS_PORT": "0",
            "LOG_LEVEL": "WARNING",
            "GRPC_TLS_CERT_FILE": tls.cert_file,
            "GRPC_TLS_KEY_FILE": tls.key_file,
            "GRPC_TLS_CA_FILE": self.ca.ca_file,
            "GRPC_TLS_SERVER_NAME": SERVER_NAME,
        }
        self.extra = {
            "identity": {
                "DKIM_MASTER_KEYS": "cluster:" + "B" * 43,
                "DNS_RESOLVER": zone.address,
                "DNS_CHECK_POLL_SECONDS": "3600",
            },
            "quota": {"SANDBOX_MAX_SEND_RATE": "500", "SANDBOX_MAX_24_HOUR_SEND": "100000"},
            "sender": {"DELIVERY_WORKERS": "0"},
            "delivery": {
                "DELIVERY_WORKERS": "16",
                "DELIVERY_MODE": "smarthost",
                "SMARTHOST": f"127.0.0.1:{sink.port}",
                "SMARTHOST_TLS": "none",
                # Short, so a killed worker's messages come back quickly.
                "DELIVERY_ACK_WAIT_SECONDS": "4",
            },
            "feedback": {},
        }
        self.processes: dict[tuple[str, int], subprocess.Popen[bytes]] = {}

    def run(self, *args: str) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run(
            [sys.executable, "-m", "postmesh.cli.main", *args], env=self.env, capture_output=True, timeout=300
        )

    def start(self, kind: str, n: int) -> None:
        serve = "sender" if kind == "delivery" else kind
        env = {
            **self.env,
            **self.extra[kind],
            "GRPC_LISTEN": f"127.0.0.1:{self.ports[(kind, n)]}",
            "DATA_DIR": str(self.tmp_path / f"{kind}{n}"),
        }
        log = (self.tmp_path / f"{kind}{n}.log").open("ab")
        self.processes[(kind, n)] = subprocess.Popen(
            [sys.executable, "-m", "postmesh.cli.main", "serve", serve], env=env, stdout=log, stderr=log
        )

    def client(self, kind: str, api_key: str) -> Client:
        target = "ipv4:" + ",".join(f"127.0.0.1:{self.ports[(kind, n)]}" for n in (0, 1))
        return Client(target, api_key, ca_file=self.ca.ca_file, server_name=SERVER_NAME)

    def wait_serving(self, within: float = 120.0) -> None:
        deadline = time.monotonic() + within
        for (kind, n), process in self.processes.items():
            address = f"127.0.0.1:{self.ports[(kind, n)]}"
            with Client(address, "", ca_file=self.ca.ca_file, server_name=SERVER_NAME) as client:
                while True:
                    assert process.poll() is None, (self.tmp_path / f"{kind}{n}.log").read_text()[-3000:]
                    try:
                        if client.health_status("", timeout=2) == "SERVING":
                            break
                    except grpc.RpcError:
                        pass
                    assert time.monotonic() < deadline, f"{kind}{n} never became SERVING"
                    time.sleep(0.3)

    def kill(self, kind: str, n: int) -> None:
        process = self.processes[(kind, n)]
        process.send_signal(signal.SIGKILL)
        process.wait(10)

    def stop(self) -> None:
        for process in self.processes.values():
            if process.poll() is None:
                process.terminate()
        for process in self.processes.values():
            try:
                process.wait(20)
            except subprocess.TimeoutExpired:
                process.kill()


def _send_all(
    cluster: Cluster, api_key: str, accepted: dict[int, str], answers: collections.Counter[str]
) -> None:
    """Sends MESSAGES messages from four threads, each retried with its request_id until final."""
    lock = threading.Lock()

    def worker(numbers: range) -> None:
        with cluster.client("sender", api_key) as client:
            for n in numbers:
                request = pb.SendEmailRequest(
                    from_email_address="news@cluster.test",
                    destination=pb.Destination(to_addresses=[f"user{n}@cluster.test"]),
                    content=pb.EmailContent(
                        simple=pb.Message(
                            subject=pb.Content(data=f"cluster {n}"), body=pb.Body(text=pb.Content(data="x"))
                        )
                    ),
                    request_id=f"cluster-{n}",
                )
                deadline = time.monotonic() + 180
                while True:
                    try:
                        reply = client.sender.SendEmail(request, timeout=20)
                        with lock:
                            accepted[n] = reply.message_id
                        break
                    except grpc.RpcError as exc:
                        with lock:
                            answers[exc.code().name] += 1
                        assert exc.code() in RETRYABLE, (n, error_details(exc))
                        assert time.monotonic() < deadline, (n, error_details(exc))
                        time.sleep(0.3)

    threads = [threading.Thread(target=worker, args=(range(k, MESSAGES, 4),), daemon=True) for k in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(300)


def test_two_of_everything_over_tls_survives_a_kill_of_each_kind(
    tmp_path: Path, nats_url: str, postgres_database: str
) -> None:
    with LoopbackDns() as zone, SmtpServer() as sink:
        cluster = Cluster(tmp_path, nats_url, postgres_database, zone, sink)
        try:
            migrated = cluster.run("migrate", *SERVICES)
            assert migrated.returncode == 0, migrated.stdout + migrated.stderr
            for kind in KINDS:
                for n in (0, 1):
                    cluster.start(kind, n)
            cluster.wait_serving()

            with cluster.client("identity", ADMIN_KEY) as admin:
                created = admin.identity.CreateAccount(
                    identity_pb2.CreateAccountRequest(name="cluster"), timeout=20
                )
            api_key = created.api_key_secret
            with cluster.client("identity", api_key) as client:
                create_verified_domain(client, zone, "cluster.test")

            accepted: dict[int, str] = {}
            answers: collections.Counter[str] = collections.Counter()
            sending = threading.Thread(
                target=_send_all, args=(cluster, api_key, accepted, answers), daemon=True
            )
            sending.start()
            deadline = time.monotonic() + 120
            while len(accepted) < MESSAGES // 3:
                assert sending.is_alive() and time.monotonic() < deadline, "sending stalled before the kills"
                time.sleep(0.2)
            for kind in KINDS:
                cluster.kill(kind, 0)
            sending.join(300)
            assert len(accepted) == MESSAGES, (
                f"accepted {len(accepted)} of {MESSAGES}; answers {dict(answers)}"
            )

            expected = set(accepted.values())

            def delivered() -> collections.Counter[str]:
                return collections.Counter(r.message_id.strip("<>").partition("@")[0] for r in sink.received)

            deadline = time.monotonic() + 180
            while not expected <= set(delivered()):
                assert time.monotonic() < deadline, (
                    f"{len(expected - set(delivered()))} accepted messages never arrived"
                )
                time.sleep(0.5)
            counts = delivered()
            duplicates = sum(counts[m] - 1 for m in expected)
            print(
                f"\ncluster: {MESSAGES} accepted through 2x{len(KINDS)} processes over TLS, one of each kind "
                f"killed mid-burst; retried answers {dict(answers)}; all delivered, {duplicates} duplicates"
            )
        finally:
            cluster.stop()
