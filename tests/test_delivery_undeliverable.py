"""A queued message that can never go out ends at once with a Reject event, instead of being retried
until it expires: its stored body has disappeared, or its content cannot be DKIM-signed."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import nats
import pytest

from postmesh.common.natsserver import free_port
from postmesh.common.outbound import enqueue
from postmesh.events.v1 import events_pb2 as ev
from postmesh.testing_mail import LoopbackDns, SmtpServer
from tests.conftest import MeshFactory
from tests.delivery_helpers import EmailEvents, forget_delivery_consumer, queued_message
from tests.faults_helpers import TcpProxy
from tests.identity_helpers import create_verified_domain


@pytest.fixture(autouse=True)
def _no_lingering_consumer(nats_url: str) -> Iterator[None]:
    yield
    asyncio.run(forget_delivery_consumer(nats_url))


async def test_lost_bodies_and_unsignable_content_end_with_a_reject_event(
    start_mesh: MeshFactory, nats_url: str
) -> None:
    port = free_port("127.0.0.2")
    with LoopbackDns() as zone, SmtpServer("127.0.0.2", port) as smtp:
        zone.add_mx("ok.test", "mx.ok.test", 10)
        zone.add_a("mx.ok.test", "127.0.0.2")
        mesh = start_mesh(
            delivery_mode="mx",
            delivery_workers=2,
            smtp_port=port,
            dns_resolver=zone.address,
            dns_check_poll_seconds=3600,
            dns_timeout_seconds=2,
            retry_base_minutes=0.01,
            retry_max_minutes=0.02,
        )
        account, key = mesh.create_account()
        with mesh.client(key) as client:
            create_verified_domain(client, zone, "example.test")

        lost = queued_message(account, ["a@ok.test"])
        lost.mime = b""
        lost.mime_object = f"gone-{lost.message_id}"  # never stored (or deleted since)
        unsignable = queued_message(account, ["b@ok.test"])
        unsignable.mime = b"From: news@example.test\r\nTo: b@ok.test\r\nnot a header\r\n\r\nbody\r\n"
        fine = queued_message(account, ["c@ok.test"])
        async with EmailEvents(nats_url, account) as events:
            nc = await nats.connect(nats_url)
            for message in (lost, unsignable, fine):
                await enqueue(nc.jetstream(), message)
            await nc.close()
            reject = ev.EMAIL_EVENT_TYPE_REJECT
            await events.wait_for(
                lambda es: (
                    bool(events.of(lost.message_id, reject) and events.of(unsignable.message_id, reject))
                    and bool(events.of(fine.message_id, ev.EMAIL_EVENT_TYPE_DELIVERY))
                ),
                within=90,
            )
            await asyncio.sleep(2)  # a moment for anything that should not come (a delay, a retry)
            await events.wait_for(lambda es: True)

        [gone] = events.of(lost.message_id)
        assert gone.event_type == reject and "no longer exists" in gone.reject.reason
        assert list(gone.mail.destination) == ["a@ok.test"]
        [bad] = events.of(unsignable.message_id)
        assert bad.event_type == reject and "cannot be DKIM-signed" in bad.reject.reason
        assert [r.recipients for r in smtp.received] == [["c@ok.test"]]


async def test_a_message_whose_dkim_keys_cannot_be_fetched_waits_for_them_without_a_failed_attempt(
    start_mesh: MeshFactory, nats_url: str
) -> None:
    """Identity unreachable (a `serve all` worker still starting, a network cut): the message is not
    attempted, so no DeliveryDelay and no retry minutes away; it goes out, signed, as soon as the keys
    can be fetched."""
    port = free_port("127.0.0.2")
    grpc_port = free_port()
    # The sender's way to identity, cut while the message waits.
    identity = TcpProxy(("127.0.0.1", grpc_port)).start()
    with LoopbackDns() as zone, SmtpServer("127.0.0.2", port) as smtp:
        zone.add_mx("ok.test", "mx.ok.test", 10)
        zone.add_a("mx.ok.test", "127.0.0.2")
        mesh = start_mesh(
            grpc_listen=f"127.0.0.1:{grpc_port}",
            identity_endpoint=f"127.0.0.1:{identity.port}",
            delivery_mode="mx",
            delivery_workers=2,
            delivery_ack_wait_seconds=4,
            smtp_port=port,
            dns_resolver=zone.address,
            dns_check_poll_seconds=3600,
            dns_timeout_seconds=2,
        )
        account, key = mesh.create_account()
        with mesh.client(key) as client:
            create_verified_domain(client, zone, "example.test")
        message = queued_message(account, ["a@ok.test"])
        identity.cut()
        async with EmailEvents(nats_url, account) as events:
            nc = await nats.connect(nats_url)
            await enqueue(nc.jetstream(), message)
            await nc.close()
            await asyncio.sleep(6)  # more than one wait for the keys
            await events.wait_for(lambda es: True)
            assert events.of(message.message_id) == [] and smtp.received == []
            identity.start()
            try:
                await events.wait_for(lambda es: bool(events.of(message.message_id)), within=90)
                await asyncio.sleep(1)
                await events.wait_for(lambda es: True)
            finally:
                identity.stop()
        assert [e.event_type for e in events.of(message.message_id)] == [ev.EMAIL_EVENT_TYPE_DELIVERY]
        [received] = smtp.received
        assert received.data.startswith(b"DKIM-Signature:")
