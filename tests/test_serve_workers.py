"""`postmesh serve all` with two worker processes (SERVE_PROCESSES=2) on one set of ports: both
workers answer calls on the one gRPC port and deliver mail; SIGKILL of a worker in the middle of a
burst loses nothing accepted (the supervisor starts it again), and a worker started again takes no
connection before it serves; the 24-hour quota holds exactly across the workers."""

from __future__ import annotations

import collections
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from postmesh.client import Client
from postmesh.common.natsserver import NatsServerProcess, free_port
from postmesh.quota.v1 import quota_pb2
from postmesh.sender.v1 import sender_pb2_grpc
from postmesh.testing import LOOPBACK_PROCESS_ENV
from tests.faults_helpers import (
    DELIVERY_WORKERS,
    RETRYABLE,
    Burst,
    Mesh,
    assert_delivered_once,
    loopback_mail,
    wait_for,
)

WORKERS = 2
DAILY_QUOTA = 40


class WorkersMesh(Mesh):
    """One `postmesh serve all` of WORKERS worker processes: identity, quota, sender (accepting and
    delivering) and feedback in each."""

    SERVICES = {"all": "all"}
    metrics_port = 0

    def address(self, name: str) -> str:
        return f"127.0.0.1:{self.ports['all']}"

    def workers(self) -> list[int]:
        """The worker processes' ids, oldest first."""
        pid = self.processes["all"].pid
        try:
            children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        except FileNotFoundError:
            return []
        return sorted(int(child) for child in children)


def _metrics_ports() -> int:
    """A port p with p+1 free too: worker i serves its metrics on METRICS_PORT + i."""
    while True:
        port = free_port()
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port + 1))
            except OSError:
                continue
        return port


@pytest.fixture
def nats_url(tmp_path: Path) -> Iterator[str]:
    server = NatsServerProcess(tmp_path / "nats").start()
    yield server.url
    server.stop()


@contextmanager
def running_workers(root: Path, nats_url: str, **env: str) -> Iterator[WorkersMesh]:
    """The mesh, SERVING, with both workers up; metrics of worker i on mesh.metrics_port + i."""
    metrics_port = _metrics_ports()
    extra = {
        "SERVE_PROCESSES": str(WORKERS),
        "DELIVERY_WORKERS": str(DELIVERY_WORKERS),
        "METRICS_PORT": str(metrics_port),
        **env,
    }
    with loopback_mail() as (dns, sink):
        mesh = WorkersMesh(root, nats_url, dns, sink, extra_env=extra)
        mesh.metrics_port = metrics_port
        try:
            mesh.start("all")
            # The second worker starts once the first is SERVING; it answers once it is SERVING too.
            wait_for(lambda: len(mesh.workers()) == WORKERS, 90, "both workers")
            for index in range(WORKERS):
                wait_for(lambda: _serving(metrics_port + index), 90, f"worker {index} SERVING")  # noqa: B023
            yield mesh
        except BaseException:
            # What the workers and the supervisor said, shown with the failure.
            log = root / "all.log"
            print(log.read_text(errors="replace")[-20_000:] if log.exists() else "(no log)")
            raise
        finally:
            mesh.stop_all()


def _serving(metrics_port: int) -> bool:
    """The worker says it is SERVING (its postmesh_serving gauge for the whole process)."""
    try:
        text = _metrics(metrics_port)
    except OSError:
        return False
    return 'postmesh_serving{service=""} 1.0' in text.splitlines()


@dataclass
class Spread:
    """SendEmail calls over `connections` TCP connections of their own (a gRPC channel shares its
    connection with every other channel of the same target unless told not to), each call retried
    with the same request_id while the answer is not final, as faults_helpers.Burst does."""

    address: str
    api_key: str
    # The kernel gives each connection to one worker by a hash of its ports: 8 connections all land on
    # the same worker about once in 128 runs, 24 about once in 8 million.
    connections: int = 24
    burst: Burst = field(init=False)

    def __post_init__(self) -> None:
        self.burst = Burst(self.address, self.api_key, 0)
        self._channels = [
            grpc.insecure_channel(self.address, options=[("grpc.use_local_subchannel_pool", 1)])
            for _ in range(self.connections)
        ]
        self._stubs = [sender_pb2_grpc.SenderServiceStub(channel) for channel in self._channels]

    def close(self) -> None:
        for channel in self._channels:
            channel.close()

    def _one(self, n: int) -> None:
        stub = self._stubs[n % len(self._stubs)]
        metadata: tuple[tuple[str, str | bytes], ...] = (("authorization", f"Bearer {self.api_key}"),)
        self.burst.send_one(lambda r: stub.SendEmail(r, timeout=10, metadata=metadata), n)

    def send(self, numbers: range, during: Callable[[], None] | None = None) -> None:
        self.burst.count += len(numbers)
        with ThreadPoolExecutor(self.connections) as pool:
            futures = [pool.submit(self._one, n) for n in numbers]
            if during is not None:
                during()
            for future in futures:
                future.result()


def _metrics(metrics_port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as response:
        return str(response.read().decode())


def _send_email_calls(metrics_port: int) -> float:
    """SendEmail calls a worker answered OK, from its own metrics endpoint."""
    total = 0.0
    for line in _metrics(metrics_port).splitlines():
        if line.startswith("postmesh_grpc_requests_total{") and "SendEmail" in line and '"OK"' in line:
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_two_workers_share_the_port_deliver_and_lose_nothing_to_a_kill(tmp_path: Path, nats_url: str) -> None:
    with running_workers(tmp_path, nats_url) as mesh:
        key = mesh.sending_account()
        spread = Spread(mesh.address("all"), key)
        try:
            spread.send(range(0, 60))
            # Both workers answered SendEmail on the one port.
            calls = [_send_email_calls(mesh.metrics_port + i) for i in range(WORKERS)]
            assert all(c > 0 for c in calls), calls
            assert sum(calls) >= 60

            first, _ = mesh.workers()

            def kill_first_worker() -> None:
                wait_for(lambda: spread.burst.accepted() >= 100, 120, "100 accepted messages")
                os.kill(first, signal.SIGKILL)

            spread.send(range(60, 300), during=kill_first_worker)
            assert first not in mesh.workers()
            # The supervisor started a new first worker; `serve all` itself kept running.
            wait_for(lambda: len(mesh.workers()) == WORKERS, 90, "the killed worker started again")
            assert mesh.processes["all"].poll() is None
        finally:
            spread.close()
        assert set(spread.burst.codes) - {grpc.StatusCode.OK} <= RETRYABLE, spread.burst.codes
        assert_delivered_once(spread.burst, mesh.sink, in_hand_at_kill=DELIVERY_WORKERS)

        # No worker outlives `serve all`, even killed with SIGKILL.
        workers = mesh.workers()
        mesh.kill("all")
        wait_for(lambda: not any(Path(f"/proc/{pid}").exists() for pid in workers), 30, "workers gone")


def test_a_restarted_worker_takes_no_connection_before_it_serves(tmp_path: Path, nats_url: str) -> None:
    """A worker started while another serves binds the shared gRPC port once every service of its
    own is SERVING: while the supervisor starts a killed worker again, every new connection the
    kernel hands out lands on a worker that answers SERVING (before, some landed on the starting
    worker, which answered NOT_SERVING, or UNAVAILABLE to calls)."""
    with running_workers(tmp_path, nats_url) as mesh:
        _, second = mesh.workers()
        os.kill(second, signal.SIGKILL)
        wait_for(lambda: second not in mesh.workers(), 30, "the second worker gone")

        def restarted() -> bool:
            return len(mesh.workers()) == WORKERS and _serving(mesh.metrics_port + 1)

        answers: collections.Counter[str] = collections.Counter()
        deadline = time.monotonic() + 90
        while not restarted():
            assert time.monotonic() < deadline, "the killed worker did not serve again"
            # A connection of its own each time: the kernel picks a listening worker per connection.
            own = [("grpc.use_local_subchannel_pool", 1)]
            channel = grpc.insecure_channel(mesh.address("all"), options=own)
            try:
                reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
                answers[health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)] += 1
            except grpc.RpcError as error:
                answers[error.code().name] += 1
            finally:
                channel.close()
        assert set(answers) == {"SERVING"}, answers
        assert answers["SERVING"] >= 5, answers  # asked throughout the restart, not once at its end
        # The restarted worker answers calls on the shared port (its own metrics count them).
        spread = Spread(mesh.address("all"), mesh.sending_account())
        try:
            spread.send(range(0, 40))
        finally:
            spread.close()
        assert _send_email_calls(mesh.metrics_port + 1) > 0


def test_a_worker_that_cannot_start_stops_serve_all_with_an_error(tmp_path: Path, nats_url: str) -> None:
    env = {
        **os.environ,
        **LOOPBACK_PROCESS_ENV,
        "GRPC_LISTEN": f"127.0.0.1:{free_port()}",
        "METRICS_PORT": "0",
        "DATA_DIR": str(tmp_path / "var"),
        "NATS_URL": nats_url,
        "SERVE_PROCESSES": str(WORKERS),
        "DKIM_MASTER_KEYS": "not a key",
    }
    process = subprocess.Popen(
        [sys.executable, "-m", "postmesh.cli.main", "serve", "all"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        output, _ = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode not in (0, None), output.decode()
    assert b"DKIM_MASTER_KEYS" in output


def test_the_24_hour_quota_holds_exactly_across_workers(tmp_path: Path, nats_url: str) -> None:
    """Every worker leases from the one quota service: together they accept exactly the quota."""
    with running_workers(tmp_path, nats_url, SANDBOX_MAX_24_HOUR_SEND=str(DAILY_QUOTA)) as mesh:
        key = mesh.sending_account()
        spread = Spread(mesh.address("all"), key)

        def counted() -> float:
            with Client(mesh.address("all"), key) as client:
                reply = client.quota.GetAccount(quota_pb2.GetAccountRequest(), timeout=10)
            return reply.send_quota.sent_last_24_hours

        try:
            start = 0
            # A lease one worker holds is refused to the other until it is returned (0.2 s): offer
            # more in rounds until a round takes nothing, every refusal a final DAILY_QUOTA_EXCEEDED.
            for _ in range(10):
                before = spread.burst.accepted()
                spread.send(range(start, start + 30))
                start += 30
                accepted = spread.burst.accepted()
                wait_for(lambda: counted() == accepted, 30, "leases returned")  # noqa: B023
                if accepted == before:
                    break
        finally:
            spread.close()
        assert spread.burst.accepted() == DAILY_QUOTA
        assert counted() == DAILY_QUOTA
        assert set(spread.burst.reasons) == {"DAILY_QUOTA_EXCEEDED"}, spread.burst.reasons
        assert set(spread.burst.codes) == {grpc.StatusCode.OK, grpc.StatusCode.RESOURCE_EXHAUSTED}
