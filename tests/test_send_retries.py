"""A client deadline or cancellation never frees a request_id: a call cancelled the moment its message
reaches JetStream (seen on the wire by a plain NATS subscription) still records its result, so the
retry answers the same message id and nothing is queued twice; and calls cut short by deadlines at
any point, then retried with the same request_id, queue exactly one message per request_id."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import nats
import pytest
from nats.js.api import DiscardPolicy

from postmesh.common.natsserver import NatsServerProcess
from postmesh.common.streams import EVENTS, outbound_subject
from postmesh.events.v1 import events_pb2
from postmesh.sender.v1 import sender_pb2 as pb
from postmesh.testing import MeshThread
from postmesh.testing_mail import LoopbackDns
from services.sender import accept
from services.sender.mime import Body
from services.sender.service import SenderService
from tests.conftest import MeshFactory
from tests.identity_helpers import create_verified_domain
from tests.sending_helpers import email_events, of_type, queued_messages, refusal

REQUESTS = 40


@pytest.fixture
def nats_server(tmp_path: Path) -> Iterator[NatsServerProcess]:
    """The test's own server: it reads what was queued off the work queue (see own_nats_server), and
    stops and starts it."""
    server = NatsServerProcess(tmp_path / "nats").start()
    yield server
    server.stop()


@pytest.fixture
def nats_url(nats_server: NatsServerProcess) -> str:
    return nats_server.url


@pytest.fixture
def sending(start_mesh: MeshFactory, nats_url: str) -> Iterator[tuple[MeshThread, str, str]]:
    """A mesh without delivery, and an account (id, key) with retries.test verified."""
    with LoopbackDns() as zone:
        mesh = start_mesh(
            delivery_workers=0,
            sandbox_max_send_rate=1000.0,
            dns_resolver=zone.address,
            dns_check_poll_seconds=3600,
            dns_timeout_seconds=2,
        )
        account_id, key = mesh.create_account()
        with mesh.client(key) as client:
            create_verified_domain(client, zone, "retries.test")
        yield mesh, account_id, key


def _request(n: int) -> pb.SendEmailRequest:
    return pb.SendEmailRequest(
        from_email_address="me@retries.test",
        destination=pb.Destination(to_addresses=[f"to{n}@retries.test"]),
        content=pb.EmailContent(
            simple=pb.Message(subject=pb.Content(data=f"n{n}"), body=pb.Body(text=pb.Content(data="x")))
        ),
        request_id=f"deadline-{n}",
    )


def test_a_call_cancelled_once_its_message_is_stored_keeps_its_key(
    sending: tuple[MeshThread, str, str],
) -> None:
    mesh, account_id, _ = sending
    assert mesh.server is not None
    sender = mesh.server.services["sender"]
    assert isinstance(sender, SenderService)
    acceptor = sender.servicer.acceptor

    def request(n: int) -> accept.SendRequest:
        return accept.SendRequest(
            envelope=accept.Envelope(
                from_email_address="me@retries.test", request_id=f"cancelled-{n}", fingerprint=f"fp-{n}"
            ),
            destination=accept.Destination(to=[f"c{n}@retries.test"]),
            simple=Body(f"cancelled {n}", "text", ""),
        )

    async def cancel_on_the_wire(n: int) -> tuple[bool, str]:
        connection = await nats.connect(mesh.settings.nats_url)
        try:
            calls: list[asyncio.Future[str]] = []

            async def stored(_msg: object) -> None:
                calls[0].cancel()

            # A JetStream publish is also a core NATS message: it is seen here as it is stored.
            await connection.subscribe(outbound_subject(account_id), cb=stored)
            await connection.flush()
            calls.append(asyncio.ensure_future(acceptor.send_email(account_id, request(n))))
            call = calls[0]
            try:
                await call
                cancelled = False
            except asyncio.CancelledError:
                cancelled = True
            # The retry: the same request_id, within the claim lease.
            deadline = time.monotonic() + 30
            while True:
                try:
                    return cancelled, await acceptor.send_email(account_id, request(n))
                except accept.Unavailable:  # REQUEST_IN_PROGRESS while the first call finishes
                    assert time.monotonic() < deadline
                    await asyncio.sleep(0.1)
        finally:
            await connection.close()

    outcomes = [mesh.run(cancel_on_the_wire(n)) for n in range(5)]
    # The scenario happened (a call cut short after its message was stored), at least once.
    assert any(cancelled for cancelled, _ in outcomes), outcomes
    queued = queued_messages(mesh.settings.nats_url, account_id, wait_for=5)
    assert sorted(q.message_id for q in queued) == sorted(message_id for _, message_id in outcomes)


def test_calls_cut_short_by_their_deadline_queue_once(sending: tuple[MeshThread, str, str]) -> None:
    mesh, account_id, key = sending
    answers: dict[int, set[str]] = {}
    with mesh.client(key) as client:
        started = time.monotonic()
        client.sender.SendEmail(_request(REQUESTS), timeout=30)
        typical = time.monotonic() - started
        for n in range(REQUESTS):
            # Deadlines from a third of a typical call to one and a half.
            try:
                timeout = typical * (0.3 + 1.2 * n / REQUESTS)
                answers.setdefault(n, set()).add(
                    client.sender.SendEmail(_request(n), timeout=timeout).message_id
                )
            except grpc.RpcError as error:
                assert error.code() in (grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.UNAVAILABLE)
        for n in range(REQUESTS):
            for _ in range(2):  # until final, then once more
                deadline = time.monotonic() + 60
                while True:
                    try:
                        answers[n].add(client.sender.SendEmail(_request(n), timeout=30).message_id)
                        break
                    except grpc.RpcError as error:
                        # Only "still in progress" while a cut-short first call finishes.
                        assert error.code() is grpc.StatusCode.UNAVAILABLE, error
                        assert time.monotonic() < deadline
                        time.sleep(0.2)
    assert all(len(ids) == 1 for ids in answers.values()), answers
    queued = queued_messages(mesh.settings.nats_url, account_id, wait_for=REQUESTS + 1)
    mine = sorted(q.message_id for q in queued if q.subject != f"n{REQUESTS}")
    assert mine == sorted(next(iter(ids)) for ids in answers.values())


def test_a_bulk_send_with_transient_failures_can_be_retried_with_its_request_id(
    sending: tuple[MeshThread, str, str], nats_server: NatsServerProcess
) -> None:
    """Entries that could not be queued (NATS down) answer TRANSIENT_FAILURE; the same request_id
    later runs the call again instead of replaying those failures, with the same message ids."""
    mesh, account_id, key = sending
    sender_service = "postmesh.sender.v1.SenderService"
    with mesh.client(key) as client:
        client.sender.CreateEmailTemplate(
            pb.CreateEmailTemplateRequest(
                template_name="bulk",
                template_content=pb.EmailTemplateContent(subject="Hi {{n}}", text="n={{n}}", html=""),
            )
        )
        bulk = pb.SendBulkEmailRequest(
            from_email_address="me@retries.test",
            default_content=pb.BulkEmailContent(
                template=pb.Template(template_name="bulk", template_data='{"n": 0}')
            ),
            bulk_email_entries=[
                pb.BulkEmailEntry(
                    destination=pb.Destination(to_addresses=[f"b{n}@retries.test"]),
                    replacement_email_content=pb.ReplacementEmailContent(
                        replacement_template=pb.ReplacementTemplate(replacement_template_data=f'{{"n": {n}}}')
                    ),
                )
                for n in range(3)
            ],
            request_id="bulk-during-outage",
        )

        def statuses(reply: pb.SendBulkEmailResponse) -> list[str]:
            return [
                pb.BulkEmailStatus.Name(r.status).removeprefix("BULK_EMAIL_STATUS_")
                for r in reply.bulk_email_entry_results
            ]

        def health() -> str:
            return client.health_status(sender_service, timeout=5)

        nats_server.stop()
        deadline = time.monotonic() + 60
        while health() != "NOT_SERVING":
            assert time.monotonic() < deadline
            time.sleep(0.2)
        during = client.sender.SendBulkEmail(bulk, timeout=30)
        assert statuses(during) == ["TRANSIENT_FAILURE"] * 3
        nats_server.start()
        while health() != "SERVING":
            assert time.monotonic() < deadline + 60
            time.sleep(0.2)
        after = client.sender.SendBulkEmail(bulk, timeout=30)
        assert statuses(after) == ["SUCCESS"] * 3
        again = client.sender.SendBulkEmail(bulk, timeout=30)
        assert [r.message_id for r in again.bulk_email_entry_results] == [
            r.message_id for r in after.bulk_email_entry_results
        ]
    queued = queued_messages(mesh.settings.nats_url, account_id, wait_for=3)
    assert sorted(q.message_id for q in queued) == sorted(
        r.message_id for r in after.bulk_email_entry_results
    )


def test_a_send_whose_event_is_not_stored_is_unavailable_and_its_retry_stores_one_of_each(
    sending: tuple[MeshThread, str, str],
) -> None:
    """The message and its Send event are published together and both confirmed before the reply:
    when the events stream refuses the event (full, here), the call answers UNAVAILABLE though its
    message was queued, and the retry with the same request_id stores the Send event under the same
    message id, without a second copy of the message."""
    mesh, account_id, key = sending

    async def events_stream_full(full: bool) -> None:
        connection = await nats.connect(mesh.settings.nats_url)
        try:
            js = connection.jetstream()
            config = (await js.stream_info(EVENTS.name)).config
            stored = (await js.stream_info(EVENTS.name)).state.messages
            config.max_msgs = stored if full else -1
            config.discard = DiscardPolicy.NEW if full else DiscardPolicy.OLD
            await js.update_stream(config)
        finally:
            await connection.close()

    request = _request(0)
    request.request_id = "event-refused"
    with mesh.client(key) as client:
        asyncio.run(events_stream_full(True))
        try:
            code, reason, _, _ = refusal(lambda: client.sender.SendEmail(request, timeout=30))
        finally:
            asyncio.run(events_stream_full(False))
        assert (code, reason) == (grpc.StatusCode.UNAVAILABLE, "QUEUE_UNAVAILABLE")
        message_id = client.sender.SendEmail(request, timeout=30).message_id
    queued = queued_messages(mesh.settings.nats_url, account_id, wait_for=1)
    assert [q.message_id for q in queued] == [message_id]
    sends = of_type(
        email_events(mesh.settings.nats_url, account_id, until=lambda found: len(found) >= 1),
        events_pb2.EMAIL_EVENT_TYPE_SEND,
    )
    assert [e.email.mail.message_id for e in sends] == [message_id]
