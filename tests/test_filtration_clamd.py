"""Virus scanning with a real clamd: messages queued as the accept side queues them go through the
delivery workers' scan stage. Findings end as one Reject event and reach no receiving server; clean
mail is delivered, DKIM-signed after the scan; a clamd killed mid-burst delays mail and loses none."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import dkim
import nats
import pytest

from postmesh.common.outbound import enqueue
from postmesh.events.v1 import events_pb2 as ev
from postmesh.sender.v1 import queue_pb2
from postmesh.sender.v1 import sender_pb2 as pb
from postmesh.testing_mail import LoopbackDns, SmtpServer
from postmesh.testing_scanners import EICAR, EICAR_SIGNATURE
from tests.conftest import MeshFactory
from tests.delivery_helpers import EmailEvents, forget_delivery_consumer, new_account_id, queued_message
from tests.dkim_verifiers import dkimpy_dns
from tests.filtration_helpers import (
    STREAM_MAX_BYTES,
    Clamd,
    encrypted_zip,
    mail,
    nested_zip,
    raw_base64_part,
    receiving_server,
    zip_bomb,
    zipped,
)
from tests.identity_helpers import create_verified_domain

DELIVERY = ev.EMAIL_EVENT_TYPE_DELIVERY
REJECT = ev.EMAIL_EVENT_TYPE_REJECT
DELAY = ev.EMAIL_EVENT_TYPE_DELIVERY_DELAY


@pytest.fixture(scope="module")
def clamd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Clamd]:
    """One clamd per module: it takes a few seconds to load its database."""
    server = Clamd(tmp_path_factory.mktemp("clamd"))
    server.start()
    yield server
    server.stop()


@pytest.fixture
def receiver() -> Iterator[tuple[SmtpServer, LoopbackDns]]:
    with receiving_server() as parts:
        yield parts


@pytest.fixture(autouse=True)
def _no_lingering_consumer(nats_url: str) -> Iterator[None]:
    yield
    asyncio.run(forget_delivery_consumer(nats_url))


def _settings(smtp: SmtpServer, dns: LoopbackDns, clamd: Clamd, **extra: object) -> dict[str, object]:
    return {
        "delivery_mode": "mx",
        "delivery_workers": 8,
        "dns_resolver": dns.address,
        "dns_timeout_seconds": 2,
        "dns_check_poll_seconds": 3600,
        "smtp_port": smtp.port,
        "smtp_helo_name": "out.postmesh.test",
        "clamd_url": clamd.url,
        "clamd_stream_max_bytes": STREAM_MAX_BYTES,
        "scan_retry_base_seconds": 0.5,
        "scan_retry_max_seconds": 2.0,
        **extra,
    }


def _with_mime(account: str, mime: bytes, recipients: list[str] | None = None) -> queue_pb2.QueuedMessage:
    queued = queued_message(account, recipients or ["someone@ok.test"])
    queued.mime = f"Message-ID: <{queued.message_id}@example.test>\r\n".encode() + mime
    return queued


async def test_findings_are_rejected_and_clean_mail_goes_out_signed(
    start_mesh: MeshFactory, nats_url: str, receiver: tuple[SmtpServer, LoopbackDns], clamd: Clamd
) -> None:
    smtp, dns = receiver
    mesh = start_mesh(**_settings(smtp, dns, clamd))
    account, key = mesh.create_account()
    with mesh.client(key) as client:
        create_verified_domain(client, dns, "example.test")
        create_verified_domain(client, dns, "ok.test")  # the sandbox sends to verified identities
    findings = {
        "attachment": (mail(EICAR, "eicar.com"), EICAR_SIGNATURE),
        "zip": (mail(zipped(("eicar.com", EICAR)), "files.zip"), EICAR_SIGNATURE),
        "raw base64 part": (raw_base64_part(EICAR), EICAR_SIGNATURE),
        "encrypted archive": (mail(encrypted_zip(), "secret.zip"), "Heuristics.Encrypted.Zip"),
        "nesting past MaxRecursion": (
            mail(nested_zip(8), "deep.zip"),
            "Heuristics.Limits.Exceeded.MaxRecursion",
        ),
        "archive bomb": (mail(zip_bomb(), "bomb.zip"), "Heuristics.Limits.Exceeded.MaxScanSize"),
        "past StreamMaxLength": (
            mail(bytes(STREAM_MAX_BYTES + 1), "big.bin"),
            "Heuristics.Limits.Exceeded.StreamMaxLength",
        ),
    }
    bad = {
        name: _with_mime(account, mime, ["a@ok.test", "b@ok.test"]) for name, (mime, _) in findings.items()
    }
    clean = _with_mime(account, mail(zipped(("notes.txt", b"quarterly figures")), "notes.zip"))
    async with EmailEvents(nats_url, account) as events:
        with mesh.client(key) as client:
            # Through the API: accepted at once (SES rejects asynchronously), then refused by the scan.
            raw = mail(EICAR, "readme.txt").replace(b"someone@ok.test", b"api@ok.test")
            via_api = client.sender.SendEmail(
                pb.SendEmailRequest(
                    from_email_address="news@example.test",
                    destination=pb.Destination(to_addresses=["api@ok.test"]),
                    content=pb.EmailContent(raw=pb.RawMessage(data=raw)),
                )
            ).message_id
        nc = await nats.connect(nats_url)
        for queued in [*bad.values(), clean]:
            await enqueue(nc.jetstream(), queued)
        await nc.close()
        await events.wait_for(
            lambda es: (
                all(events.of(q.message_id, REJECT) for q in bad.values())
                and bool(events.of(clean.message_id, DELIVERY))
                and bool(events.of(via_api, REJECT))
            ),
            within=90,
        )
    for name, queued in bad.items():
        (reject,) = events.of(queued.message_id, REJECT)  # one per message
        assert reject.reject.reason == "Bad content", name
        assert reject.reject.filter == "virus"
        assert reject.reject.details == f"virus: {findings[name][1]}", name
        assert sorted(reject.mail.destination) == ["a@ok.test", "b@ok.test"]
        assert reject.filtration.virus_scanned
        assert not events.of(queued.message_id, DELIVERY), name
    arrived = list(smtp.received)
    assert [clean.message_id in r.message_id for r in arrived] == [True]  # no finding reached it
    (api_reject,) = events.of(via_api, REJECT)
    assert api_reject.reject.details == f"virus: {EICAR_SIGNATURE}"
    assert list(api_reject.mail.destination) == ["api@ok.test"]
    (delivery,) = events.of(clean.message_id, DELIVERY)
    assert delivery.filtration.virus_scanned
    verifier = dkim.DKIM(arrived[0].data)
    assert verifier.verify(0, dnsfunc=dkimpy_dns(dns))


async def test_clamd_killed_mid_burst_delays_mail_and_loses_none(
    start_mesh: MeshFactory, nats_url: str, receiver: tuple[SmtpServer, LoopbackDns], clamd: Clamd
) -> None:
    smtp, dns = receiver
    mesh = start_mesh(("sender",), **_settings(smtp, dns, clamd))

    async def virus_health(expected: str) -> None:
        deadline = asyncio.get_running_loop().time() + 60
        with mesh.client() as client:
            while (status := client.health_status("postmesh.filtration.virus")) != expected:
                assert asyncio.get_running_loop().time() < deadline, status
                await asyncio.sleep(0.2)

    await virus_health("SERVING")
    account = new_account_id()
    burst = [queued_message(account, [f"r{i}@ok.test"]) for i in range(12)]
    infected = _with_mime(account, mail(EICAR, "eicar.com"))
    async with EmailEvents(nats_url, account) as events:
        nc = await nats.connect(nats_url)
        js = nc.jetstream()
        for queued in burst[:4]:
            await enqueue(js, queued)
        clamd.stop()
        try:
            for queued in [*burst[4:], infected]:
                await enqueue(js, queued)
            # Whatever was not scanned before the kill waits, with a DeliveryDelay saying why.
            await events.wait_for(lambda es: any(e.email.event_type == DELAY for e in es), within=60)
            waiting = [e for e in events.events if e.email.event_type == DELAY]
            assert all(e.email.delivery_delay.delay_type == "InternalFailure" for e in waiting)
            assert all(
                "virus scanner unavailable" in r.diagnostic_code
                for e in waiting
                for r in e.email.delivery_delay.delayed_recipients
            )
            sent_while_down = {r.message_id for r in smtp.received}
            await virus_health("NOT_SERVING")  # health says so, the sender itself still serves
            with mesh.client() as client:
                assert client.health_status("postmesh.sender.v1.SenderService") == "SERVING"
        finally:
            clamd.start()
        await nc.close()
        await events.wait_for(
            lambda es: (
                all(events.of(q.message_id, DELIVERY) for q in burst)
                and bool(events.of(infected.message_id, REJECT))
            ),
            within=120,
        )
    await virus_health("SERVING")
    delayed_ids = {e.email.mail.message_id for e in events.events if e.email.event_type == DELAY}
    assert delayed_ids and not any(i in m for i in delayed_ids for m in sent_while_down)
    received = [r.message_id for r in smtp.received]
    for queued in burst:
        assert sum(queued.message_id in m for m in received) == 1  # delivered once: none lost, none twice
        (delivery,) = events.of(queued.message_id, DELIVERY)
        assert delivery.filtration.virus_scanned
    assert not any(infected.message_id in m for m in received)
