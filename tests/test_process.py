"""`postmesh serve` as a real process: metrics, graceful shutdown on SIGTERM with a call in flight."""

from __future__ import annotations

import signal
import sqlite3
import threading
import time
import urllib.request

import grpc
import pytest

from postmesh.client import Client
from postmesh.identity.v1 import identity_pb2


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
