"""The database made unreachable (a TCP proxy the test owns in front of PostgreSQL, cut then restored,
in the middle of a burst; for SQLite, the file made unavailable): callers hear UNAVAILABLE with
RetryInfo (never INTERNAL), health is NOT_SERVING while it lasts and SERVING again without a restart;
with clients that retry every non-final answer with the same request_id, each retry after JetStream's
duplicate window, every request ends accepted and every accepted message arrives exactly once."""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import create_async_engine

from postmesh.client import error_details
from postmesh.common import db
from postmesh.common.natsserver import NatsServerProcess, free_port
from postmesh.events.v1 import events_pb2
from postmesh.sender.v1 import sender_pb2 as pb
from tests.conftest import MeshFactory
from tests.faults_helpers import (
    DUPLICATE_WINDOW,
    MESSAGE_ID_DOMAIN,
    Burst,
    Mesh,
    TcpProxy,
    arrivals,
    assert_delivered_once,
    health,
    loopback_mail,
    request,
    running_mesh,
    wait_for,
)
from tests.identity_helpers import create_verified_domain
from tests.sending_helpers import email_events

BURST = 200
SENDER = "postmesh.sender.v1.SenderService"


@pytest.fixture
def proxied_database(postgres_database: str) -> Iterator[tuple[str, TcpProxy]]:
    url = make_url(postgres_database)
    proxy = TcpProxy((url.host or "127.0.0.1", url.port or 5432)).start()
    try:
        yield url.set(port=proxy.port).render_as_string(hide_password=False), proxy
    finally:
        proxy.stop()


@pytest.fixture
def mesh(tmp_path: Path, proxied_database: tuple[str, TcpProxy]) -> Iterator[Mesh]:
    server = NatsServerProcess(tmp_path / "nats").start()
    try:
        with running_mesh(tmp_path, server.url, {"DATABASE_URL": proxied_database[0]}) as mesh:
            yield mesh
    finally:
        server.stop()


def test_database_cut_mid_burst_answers_unavailable_and_duplicates_nothing(
    mesh: Mesh, proxied_database: tuple[str, TcpProxy]
) -> None:
    _, proxy = proxied_database
    key = mesh.sending_account()
    burst = Burst(mesh.address("accept"), key, BURST)
    seen_not_serving: list[str] = []

    def outage(running: Burst) -> None:
        wait_for(lambda: running.accepted() >= BURST // 4, 120, "a quarter of the burst accepted")
        proxy.cut()
        wait_for(lambda: health(mesh.address("accept"), SENDER) == "NOT_SERVING", 60, "sender NOT_SERVING")
        seen_not_serving.append(SENDER)
        time.sleep(3)
        proxy.start()
        wait_for(lambda: health(mesh.address("accept"), SENDER) == "SERVING", 60, "sender SERVING again")

    burst.run(outage)
    assert seen_not_serving == [SENDER]
    assert set(burst.codes) - {grpc.StatusCode.OK} <= {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
    }, burst.codes
    assert burst.reasons["DATABASE_UNAVAILABLE"] > 0, burst.reasons
    assert_delivered_once(burst, mesh.sink)
    assert burst.replay() == burst.message_ids
    assert_delivered_once(burst, mesh.sink, settle=2.0)
    for name, service in (("core", ""), ("accept", SENDER)):
        assert health(mesh.address(name), service) == "SERVING"


def test_sqlite_file_unavailable_answers_unavailable_until_it_is_back(
    start_mesh: MeshFactory, tmp_path: Path
) -> None:
    """SQLite: the sender's database file made unavailable (its directory moved away, the pool's open
    connections closed) and brought back, in a mesh that keeps running."""
    directory = tmp_path / "sender-db"
    mesh = start_mesh(sender_database_url=f"sqlite+aiosqlite:///{directory / 'sender.db'}")
    _, key = mesh.create_account()
    assert mesh.server is not None
    engine = mesh.server.services["sender"].runtime.engine
    assert engine is not None
    send = pb.SendEmailRequest(
        from_email_address="me@not-verified.test",
        destination=pb.Destination(to_addresses=["to@not-verified.test"]),
        content=pb.EmailContent(
            simple=pb.Message(subject=pb.Content(data="s"), body=pb.Body(text=pb.Content(data="b")))
        ),
        request_id="sqlite-outage",
    )
    with mesh.client(key) as client:
        directory.rename(tmp_path / "moved-away")
        mesh.run(engine.dispose())
        for call in (
            lambda: client.sender.SendEmail(send, timeout=30),
            lambda: client.sender.ListEmailTemplates(pb.ListEmailTemplatesRequest(), timeout=30),
        ):
            with pytest.raises(grpc.RpcError) as excinfo:
                call()
            details = error_details(excinfo.value)
            assert (details.code, details.reason) == (grpc.StatusCode.UNAVAILABLE, "DATABASE_UNAVAILABLE")
            assert details.retry_after_seconds
        wait_for(lambda: health(mesh.address, SENDER) == "NOT_SERVING", 30, "sender NOT_SERVING")
        (tmp_path / "moved-away").rename(directory)
        wait_for(lambda: health(mesh.address, SENDER) == "SERVING", 30, "sender SERVING again")
        client.sender.ListEmailTemplates(pb.ListEmailTemplatesRequest(), timeout=30)
        # The send path works again: this one is refused for its unverified sender, as it should be.
        with pytest.raises(grpc.RpcError) as refused:
            client.sender.SendEmail(send, timeout=30)
        assert error_details(refused.value).reason == "MESSAGE_REJECTED"


def test_a_result_never_recorded_is_resolved_after_the_duplicate_window(
    start_mesh: MeshFactory, tmp_path: Path
) -> None:
    """The database went away after the message was queued, so the call's result was never recorded
    (the claim is left as the failed call leaves it). A retry after JetStream's duplicate window
    answers the same message id, and the message still arrives once."""
    server = NatsServerProcess(tmp_path / "nats").start()
    try:
        with loopback_mail() as (dns, sink):
            mesh = start_mesh(
                nats_url=server.url,
                delivery_workers=2,
                delivery_mode="smarthost",
                smarthost=f"127.0.0.1:{sink.port}",
                smarthost_tls="none",
                message_id_domain=MESSAGE_ID_DOMAIN,
                nats_duplicate_window_seconds=DUPLICATE_WINDOW,
                send_request_claim_seconds=1.0,
                sandbox_max_send_rate=1000.0,
                dns_resolver=dns.address,
                dns_check_poll_seconds=3600,
                dns_timeout_seconds=2,
            )
            account_id, key = mesh.create_account()
            with mesh.client(key) as client:
                create_verified_domain(client, dns, "faults.test")
                first = client.sender.SendEmail(request(1), timeout=30).message_id
                wait_for(lambda: arrivals(sink)[first] == 1, 60, "the message to arrive")
                # What a failed finish leaves: the claim without a result, its lease run out.
                with sqlite3.connect(tmp_path / "mesh0" / "sender.db") as database:
                    changed = database.execute(
                        "UPDATE send_requests SET result = '' WHERE request_id = ?",
                        (request(1).request_id,),
                    ).rowcount
                assert changed == 1
                time.sleep(max(DUPLICATE_WINDOW, 1.0) + 0.5)
                assert client.sender.SendEmail(request(1), timeout=30).message_id == first
                assert client.sender.SendEmail(request(1), timeout=30).message_id == first
            # The second copy was queued (past the window, JetStream stored it) and dropped by the
            # delivery workers; a later message shows they have moved past it.
            with mesh.client(key) as client:
                later = client.sender.SendEmail(request(2), timeout=30).message_id
            wait_for(lambda: arrivals(sink)[later] == 1, 60, "a later message to arrive")
            time.sleep(2)
            assert arrivals(sink)[first] == 1
            # Its Send event was published again, under the same event id: counted once.
            sends = [
                e
                for e in email_events(server.url, account_id)
                if e.email.event_type == events_pb2.EMAIL_EVENT_TYPE_SEND and e.email.mail.message_id == first
            ]
            assert len(sends) == 2 and len({e.event_id for e in sends}) == 1
    finally:
        server.stop()


def test_health_follows_the_database_while_no_call_needs_it(start_mesh: MeshFactory, tmp_path: Path) -> None:
    directory = tmp_path / "feedback-db"
    mesh = start_mesh(
        feedback_database_url=f"sqlite+aiosqlite:///{directory / 'feedback.db'}", database_probe_seconds=0.5
    )
    assert mesh.server is not None
    engine = mesh.server.services["feedback"].runtime.engine
    assert engine is not None
    feedback = "postmesh.feedback.v1.FeedbackService"
    directory.rename(tmp_path / "moved-away")
    mesh.run(engine.dispose())
    wait_for(lambda: health(mesh.address, feedback) == "NOT_SERVING", 30, "feedback NOT_SERVING")
    assert health(mesh.address, SENDER) == "SERVING"
    assert health(mesh.address, "") == "NOT_SERVING"
    (tmp_path / "moved-away").rename(directory)
    wait_for(lambda: health(mesh.address, feedback) == "SERVING", 30, "feedback SERVING again")
    assert health(mesh.address, "") == "SERVING"


async def test_only_an_unreachable_database_counts_as_an_outage(tmp_path: Path) -> None:
    """Errors of a database that cannot be reached are outages (UNAVAILABLE); a statement that is
    wrong is a bug and stays INTERNAL."""
    blocked = tmp_path / "a-file"
    blocked.write_text("not a directory")
    cases = [
        (f"sqlite+aiosqlite:///{tmp_path / 'ok.db'}", "SELECT * FROM no_such_table", False),
        (f"sqlite+aiosqlite:///{tmp_path / 'ok.db'}", "SELECT 1", None),
        (f"postgresql+asyncpg://postgres@127.0.0.1:{free_port()}/none", "SELECT 1", True),
    ]
    for url, statement, outage in cases:
        engine = db.create_engine(url)
        try:
            async with engine.connect() as connection:
                await connection.exec_driver_sql(statement)
        except Exception as exc:
            assert db.unreachable(exc) is outage, (url, statement, exc)
        else:
            assert outage is None
        finally:
            await engine.dispose()
    # A SQLite file that cannot be opened (its directory is a file).
    engine = create_async_engine(f"sqlite+aiosqlite:///{blocked / 'x.db'}")
    with pytest.raises(Exception) as excinfo:
        async with engine.connect() as connection:
            await connection.exec_driver_sql("SELECT 1")
    await engine.dispose()
    assert db.unreachable(excinfo.value)
    assert not await db.reachable(engine)
