"""SIGKILL of nats-server, of the accepting process and of the delivery process in the middle of a
burst, with clients that retry every non-final answer with the same request_id (each retry after
JetStream's duplicate window): every request ends accepted, every accepted message arrives exactly
once (a killed delivery process may send again only what it had in hand), the clients see only
UNAVAILABLE or a deadline before their final answer, and asking again with the same request_id
returns the same message id."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from postmesh.client import Client, error_details
from postmesh.common.natsserver import NatsServerProcess
from tests.faults_helpers import (
    DELIVERY_WORKERS,
    Burst,
    Mesh,
    assert_delivered_once,
    health,
    request,
    running_mesh,
    wait_for,
)

BURST = 200
SENDER = "postmesh.sender.v1.SenderService"


@pytest.fixture
def nats_server(tmp_path: Path) -> Iterator[NatsServerProcess]:
    """The test's own nats-server: it is killed and restarted on the same port and store."""
    server = NatsServerProcess(tmp_path / "nats").start()
    yield server
    server.stop()


@pytest.fixture
def mesh(request: pytest.FixtureRequest, tmp_path: Path, nats_server: NatsServerProcess) -> Iterator[Mesh]:
    """On SQLite (a file per process and service), or on one PostgreSQL database for all."""
    env = {}
    if request.node.callspec.params["database"] == "postgres":
        env["DATABASE_URL"] = request.getfixturevalue("postgres_database")
    with running_mesh(tmp_path, nats_server.url, env) as mesh:
        yield mesh


def _kill_when(burst: Burst, accepted: int) -> None:
    wait_for(lambda: burst.accepted() >= accepted, 120, f"{accepted} accepted messages")


@pytest.mark.parametrize(
    ("victim", "database"),
    [
        ("nats-server", "sqlite"),
        ("accept", "sqlite"),
        ("deliver", "sqlite"),
        ("nats-server", "postgres"),
        ("accept", "postgres"),
    ],
)
def test_sigkill_mid_burst_loses_and_duplicates_nothing(
    mesh: Mesh, nats_server: NatsServerProcess, victim: str, database: str
) -> None:
    key = mesh.sending_account()
    burst = Burst(mesh.address("accept"), key, BURST)

    def fault(running: Burst) -> None:
        _kill_when(running, BURST // 4)
        if victim == "nats-server":
            assert nats_server.process is not None
            nats_server.process.kill()
            nats_server.process.wait()
            # Once the outage is known: NOT_SERVING, and a send answers UNAVAILABLE at once.
            accept = mesh.address("accept")
            wait_for(lambda: health(accept, SENDER) == "NOT_SERVING", 30, "accept NOT_SERVING")
            with Client(accept, key) as client:
                with pytest.raises(grpc.RpcError) as excinfo:
                    client.sender.SendEmail(request(BURST + 1), timeout=10)
            details = error_details(excinfo.value)
            assert (details.code, details.reason) == (grpc.StatusCode.UNAVAILABLE, "QUEUE_UNAVAILABLE")
            assert details.retry_after_seconds
            nats_server.start()
            wait_for(lambda: health(accept, SENDER) == "SERVING", 60, "accept SERVING again")
        else:
            mesh.kill(victim)
            time.sleep(1)
            mesh.start(victim)

    burst.run(fault)
    assert set(burst.codes) - {grpc.StatusCode.OK} <= {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
    }, burst.codes
    # Only a delivery process killed mid-SMTP may send what it had in hand again (SMTP's own window).
    in_hand = DELIVERY_WORKERS if victim == "deliver" else 0
    assert_delivered_once(burst, mesh.sink, in_hand_at_kill=in_hand)
    assert burst.replay() == burst.message_ids
    assert_delivered_once(burst, mesh.sink, settle=2.0, in_hand_at_kill=in_hand)
