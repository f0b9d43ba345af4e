"""`postmesh serve` as a real process: metrics, graceful shutdown on SIGTERM with a call in flight."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import grpc
import pytest

from postmesh.client import Client
from postmesh.common.natsserver import free_port
from postmesh.identity.v1 import identity_pb2


def _wait_serving(address: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    with Client(address) as client:
        while True:
            try:
                if client.health_status("", timeout=2) == "SERVING":
                    return
            except grpc.RpcError:
                pass
            assert time.monotonic() < deadline, "postmesh serve did not become SERVING"
            time.sleep(0.2)


@pytest.fixture
def serve_process(nats_url: str, tmp_path: Path):  # type: ignore[no-untyped-def]
    port, metrics_port = free_port(), free_port()
    env = {
        **os.environ,
        "GRPC_LISTEN": f"127.0.0.1:{port}",
        "METRICS_PORT": str(metrics_port),
        "DATA_DIR": str(tmp_path / "var"),
        "NATS_URL": nats_url,
        "ADMIN_API_KEY": "admin-secret",
        "SHUTDOWN_GRACE_SECONDS": "30",
        "LOG_LEVEL": "WARNING",
        # Identity needs a DKIM master key; its link server and DNS checker stay on loopback.
        "DKIM_MASTER_KEYS": "test:" + "A" * 43,
        "IDENTITY_HTTP_LISTEN": "127.0.0.1:0",
        "HTTP_API_LISTEN": "127.0.0.1:0",
        "DNS_RESOLVER": "127.0.0.1:9",
        # Delivery workers would hold the outbound work queue's consumer after the process is gone.
        "DELIVERY_WORKERS": "0",
    }
    process = subprocess.Popen(
        [sys.executable, "-m", "postmesh.cli.main", "serve", "all"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        _wait_serving(f"127.0.0.1:{port}")
        yield process, f"127.0.0.1:{port}", metrics_port, tmp_path / "var"
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def test_metrics_endpoint_counts_rpcs(serve_process) -> None:  # type: ignore[no-untyped-def]
    _, address, metrics_port, _ = serve_process
    with Client(address, "admin-secret") as admin:
        admin.identity.CreateAccount(identity_pb2.CreateAccountRequest(name="m"))
    body = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).read().decode()
    assert (
        'postmesh_grpc_requests_total{code="OK",method="/postmesh.identity.v1.IdentityService/CreateAccount"}'
        in body
    )


def test_sigterm_finishes_the_call_in_flight_then_exits(serve_process) -> None:  # type: ignore[no-untyped-def]
    process, address, _, data_dir = serve_process
    # Hold the identity database's write lock so CreateAccount stays in flight while SIGTERM arrives.
    blocker = sqlite3.connect(data_dir / "identity.db", timeout=30)
    blocker.execute("BEGIN IMMEDIATE")
    result: dict[str, object] = {}

    def call() -> None:
        with Client(address, "admin-secret") as admin:
            try:
                result["reply"] = admin.identity.CreateAccount(
                    identity_pb2.CreateAccountRequest(name="late"), timeout=60
                )
            except grpc.RpcError as exc:
                result["error"] = exc

    caller = threading.Thread(target=call)
    caller.start()
    time.sleep(1.0)  # the call is now waiting on the lock
    process.send_signal(signal.SIGTERM)
    time.sleep(1.0)
    # No new calls are accepted once shutdown began...
    with Client(address, "admin-secret") as admin, pytest.raises(grpc.RpcError):
        admin.identity.ListAccounts(identity_pb2.ListAccountsRequest(), timeout=5)
    assert process.poll() is None, "the server quit with a call still in flight"
    blocker.rollback()
    blocker.close()
    caller.join(60)
    # ...but the one in flight completed, and then the process exited cleanly.
    assert "reply" in result, result.get("error")
    assert process.wait(30) == 0
