"""Delivery end to end: messages queued on JetStream (as the accept side queues them) are delivered
by the sender's workers over SMTP to real servers found through a DNS server on loopback, and every
recipient's outcome arrives as one event on POSTMESH_EVENTS."""

from __future__ import annotations

import asyncio
import datetime as dt
import socket
from collections.abc import Iterator
from pathlib import Path

import dkim
import nats
import pytest
from nats.js.errors import KeyNotFoundError

from postmesh.common.natsserver import free_port
from postmesh.common.outbound import enqueue, queued_ledger
from postmesh.common.verp import VerpKey, parse_bounce_address
from postmesh.events.v1 import events_pb2 as ev
from postmesh.identity.v1 import identity_pb2
from postmesh.testing_mail import Behaviour, LoopbackDns, SmtpServer
from tests.conftest import MeshFactory
from tests.delivery_helpers import (
    EmailEvents,
    forget_delivery_consumer,
    new_account_id,
    queued_message,
    wait_until,
)
from tests.dkim_verifiers import dkimpy_dns

DELIVERY = ev.EMAIL_EVENT_TYPE_DELIVERY
BOUNCE = ev.EMAIL_EVENT_TYPE_BOUNCE
DELAY = ev.EMAIL_EVENT_TYPE_DELIVERY_DELAY


def _shared_port() -> int:
    """One port free on every loopback address the MX servers use (SMTP_PORT is one for all MXs)."""
    for _ in range(50):
        port = free_port("127.0.0.2")
        try:
            for host in ("127.0.0.3", "127.0.0.4"):
                with socket.socket() as probe:
                    probe.bind((host, port))
            return port
        except OSError:
            continue
    raise RuntimeError("no common free port")


class World:
    """Three receiving MX servers and the zone pointing at them."""

    def __init__(self) -> None:
        self.port = _shared_port()
        self.ok = SmtpServer("127.0.0.2", self.port)
        self.unknown = SmtpServer(
            "127.0.0.3",
            self.port,
            Behaviour(
                reject={"gone@unknown.test": "550 5.1.1 <gone@unknown.test>: Recipient address rejected"},
                reject_all_rcpt="",
            ),
        )
        self.flaky = SmtpServer("127.0.0.4", self.port, Behaviour(defer_first=1))
        self.dns = LoopbackDns()
        zone = self.dns
        zone.add_mx("ok.test", "mx1.ok.test", 10)
        zone.add_a("mx1.ok.test", "127.0.0.2")
        zone.add_mx("unknown.test", "mx.unknown.test", 10)
        zone.add_a("mx.unknown.test", "127.0.0.3")
        zone.add_mx("flaky.test", "mx.flaky.test", 10)
        zone.add_a("mx.flaky.test", "127.0.0.4")
        zone.add_a("nomx.test", "127.0.0.2")  # no MX: the A record is the implicit MX
        zone.add_mx("null.test", ".", 0)
        # The preferred MX refuses connections (nothing listens on 127.0.0.9): the backup takes it.
        zone.add_mx("pref.test", "down.pref.test", 5)
        zone.add_a("down.pref.test", "127.0.0.9")
        zone.add_mx("pref.test", "mx1.ok.test", 20)
        zone.add_mx("down.test", "down.pref.test", 10)

    def __enter__(self) -> World:
        for part in (self.ok, self.unknown, self.flaky, self.dns):
            part.start()
        return self

    def __exit__(self, *_: object) -> None:
        for part in (self.ok, self.unknown, self.flaky, self.dns):
            part.stop()


@pytest.fixture(autouse=True)
def _no_lingering_consumer(nats_url: str) -> Iterator[None]:
    # Set up before the meshes, so torn down after them: the workers are stopped by then.
    yield
    asyncio.run(forget_delivery_consumer(nats_url))


@pytest.fixture
def world() -> Iterator[World]:
    with World() as w:
        yield w


def _mx_settings(world: World, **extra: object) -> dict[str, object]:
    return {
        "delivery_mode": "mx",
        "delivery_workers": 16,
        "dns_resolver": world.dns.address,
        "smtp_port": world.port,
        "smtp_helo_name": "out.postmesh.test",
        "default_bounce_domain": "bounces.postmesh.test",
        "retry_base_minutes": 0.01,  # 0.6 s, so the retry is seen within the test
        "retry_max_minutes": 0.02,
        **extra,
    }


async def test_outcomes_per_recipient_become_events(
    start_mesh: MeshFactory, nats_url: str, world: World
) -> None:
    mesh = start_mesh(("sender",), **_mx_settings(world))
    verp_key = VerpKey.from_settings(mesh.settings)
    account = new_account_id()
    delivered = queued_message(account, ["Someone@ok.test"])
    mixed = queued_message(account, ["gone@unknown.test", "fine@unknown.test", "x@null.test"])
    pair = queued_message(account, ["a@ok.test", "b@ok.test"])
    backup = queued_message(account, ["c@pref.test", "d@nomx.test"])
    retried = queued_message(account, ["later@flaky.test"])
    messages = [delivered, mixed, pair, backup, retried]
    async with EmailEvents(nats_url, account) as events:
        nc = await nats.connect(nats_url)
        for message in messages:
            await enqueue(nc.jetstream(), message)
        await nc.close()
        final = {DELIVERY, BOUNCE}
        expected = sum(len(m.recipients) for m in messages)
        await events.wait_for(
            lambda es: sum(1 for e in es if e.email.event_type in final) >= expected, within=90
        )

    # 2xx: a Delivery event with the remote reply, the remote address and the timing.
    [only] = events.of(delivered.message_id)
    assert only.event_type == DELIVERY
    assert list(only.delivery.recipients) == ["Someone@ok.test"]
    assert only.delivery.smtp_response == "250 2.0.0 OK queued"
    assert only.delivery.remote_mta_ip == "127.0.0.2"
    assert only.delivery.reporting_mta == "out.postmesh.test"
    assert only.delivery.processing_time_millis >= 0
    assert only.mail.source == "news@example.test" and only.mail.sending_account_id == account
    [arrived] = [r for r in world.ok.received if r.recipients == ["Someone@ok.test"]]
    verp = parse_bounce_address(arrived.mail_from, verp_key)
    assert verp is not None and verp.message_id == delivered.message_id
    assert verp.recipient == "Someone@ok.test"
    assert arrived.mail_from.endswith("@bounces.postmesh.test")
    assert delivered.message_id in arrived.message_id

    # 5xx: a Permanent bounce with the diagnostic code; a null MX bounces without any connection.
    by_rcpt = {e.bounce.bounced_recipients[0].email_address: e for e in events.of(mixed.message_id, BOUNCE)}
    gone = by_rcpt["gone@unknown.test"].bounce
    assert gone.bounce_type == ev.BOUNCE_TYPE_PERMANENT
    assert gone.bounce_sub_type == ev.BOUNCE_SUB_TYPE_NO_EMAIL
    assert gone.bounced_recipients[0].status == "5.1.1"
    assert "550 5.1.1" in gone.bounced_recipients[0].diagnostic_code
    assert gone.remote_mta_ip == "127.0.0.3"
    null = by_rcpt["x@null.test"].bounce
    assert (null.bounce_type, null.bounce_sub_type) == (ev.BOUNCE_TYPE_PERMANENT, ev.BOUNCE_SUB_TYPE_GENERAL)
    assert null.bounced_recipients[0].status == "5.1.10"
    [fine] = events.of(mixed.message_id, DELIVERY)
    assert list(fine.delivery.recipients) == ["fine@unknown.test"]
    assert [r.recipients for r in world.unknown.received] == [["fine@unknown.test"]]

    # Two recipients of one domain: one transaction, the bounce address naming the message only.
    [together] = [r for r in world.ok.received if set(r.recipients) == {"a@ok.test", "b@ok.test"}]
    verp = parse_bounce_address(together.mail_from, verp_key)
    assert verp is not None and verp.message_id == pair.message_id and verp.recipient is None
    assert len(events.of(pair.message_id, DELIVERY)) == 2

    # MX preference with a dead primary, and the A fallback of a domain without MX.
    assert {tuple(e.delivery.recipients) for e in events.of(backup.message_id, DELIVERY)} == {
        ("c@pref.test",),
        ("d@nomx.test",),
    }

    # 4xx: a DeliveryDelay, then the retry delivers (the same Message-ID, received once).
    [delay] = events.of(retried.message_id, DELAY)
    assert delay.delivery_delay.delay_type == "RecipientServerError"
    assert delay.delivery_delay.delayed_recipients[0].status == "4.3.0"
    assert delay.delivery_delay.attempt == 1
    assert delay.delivery_delay.next_attempt_time.ToDatetime() > delay.delivery_delay.timestamp.ToDatetime()
    assert len(events.of(retried.message_id, DELIVERY)) == 1
    assert world.flaky.handler.data_commands == 2
    [late] = world.flaky.received
    assert retried.message_id in late.message_id

    # Each outcome is one event: nothing else was published for these messages.
    assert len(events.events) == expected + 1


async def test_retries_end_in_a_transient_bounce_when_the_message_expires(
    start_mesh: MeshFactory, nats_url: str, world: World
) -> None:
    start_mesh(("sender",), **_mx_settings(world))
    account = new_account_id()
    doomed = queued_message(account, ["nobody@down.test"], expire_in=dt.timedelta(seconds=2))
    stale = queued_message(account, ["x@ok.test"], expire_in=dt.timedelta(seconds=-1))
    async with EmailEvents(nats_url, account) as events:
        nc = await nats.connect(nats_url)
        await enqueue(nc.jetstream(), doomed)
        await enqueue(nc.jetstream(), stale)
        await nc.close()
        await events.wait_for(lambda es: sum(e.email.event_type == BOUNCE for e in es) >= 2, within=90)
    [bounce] = events.of(doomed.message_id, BOUNCE)
    assert bounce.bounce.bounce_type == ev.BOUNCE_TYPE_TRANSIENT
    assert bounce.bounce.bounced_recipients[0].email_address == "nobody@down.test"
    delays = events.of(doomed.message_id, DELAY)
    assert delays and all(d.delivery_delay.delay_type == "TransientCommunicationFailure" for d in delays)
    assert [d.delivery_delay.attempt for d in delays] == list(range(1, len(delays) + 1))
    [expired] = events.of(stale.message_id)
    assert expired.event_type == BOUNCE and expired.bounce.bounce_type == ev.BOUNCE_TYPE_TRANSIENT
    assert not any(r.recipients == ["x@ok.test"] for r in world.ok.received)


async def test_sink_mode_stores_eml_files_and_reports_deliveries(
    start_mesh: MeshFactory, nats_url: str, tmp_path: Path
) -> None:
    data_dir = tmp_path / "sinkmesh"
    mesh = start_mesh(("sender",), data_dir=data_dir, delivery_workers=4)  # DELIVERY_MODE defaults to sink
    account = new_account_id()
    message = queued_message(account, ["one@example.test", "two@other.test"], subject="Stored")
    async with EmailEvents(nats_url, account) as events:
        nc = await nats.connect(nats_url)
        await enqueue(nc.jetstream(), message)
        await nc.close()
        await events.wait_for(lambda es: len(es) >= 2)
    assert {tuple(e.email.delivery.recipients) for e in events.events} == {
        ("one@example.test",),
        ("two@other.test",),
    }
    stored = (data_dir / "mail" / f"{message.message_id}.eml").read_bytes()
    assert b"Subject: Stored" in stored and b"Delivered-To: two@other.test" in stored
    assert stored.startswith(b"Return-Path: <bounce+" + message.message_id.encode() + b"-0-")
    return_path = stored.split(b"\r\n", 1)[0].decode().removeprefix("Return-Path: ")
    verp = parse_bounce_address(return_path, VerpKey.from_settings(mesh.settings))
    assert verp is not None and verp.message_id == message.message_id and verp.recipient is None


def test_no_workers_when_delivery_is_disabled(start_mesh: MeshFactory) -> None:
    mesh = start_mesh(("sender",), delivery_workers=0, delivery_mode="mx")
    assert mesh.server is not None
    assert mesh.server.services["sender"].delivery is None  # type: ignore[attr-defined]


async def test_messages_arrive_signed_with_the_domains_keys_from_identity(
    start_mesh: MeshFactory, nats_url: str, world: World
) -> None:
    mesh = start_mesh(**_mx_settings(world), dns_check_poll_seconds=3600, dns_timeout_seconds=2)
    account, key = mesh.create_account()
    with mesh.client(key) as client:
        created = client.identity.CreateEmailIdentity(
            identity_pb2.CreateEmailIdentityRequest(
                email_identity="example.test",
                dkim_signing_attributes=identity_pb2.DkimSigningAttributes(include_ed25519=True),
            )
        )
        for record in created.dns_records:
            assert record.type == "TXT"
            world.dns.add_txt(record.name, record.value)
        checked = client.identity.CheckEmailIdentityVerification(
            identity_pb2.CheckEmailIdentityVerificationRequest(email_identity="example.test")
        ).identity
        assert checked.verification_status == identity_pb2.VERIFICATION_STATUS_SUCCESS
    signed = queued_message(account, ["signed@ok.test", "also@ok.test", "third@nomx.test"])
    async with EmailEvents(nats_url, account) as events:
        nc = await nats.connect(nats_url)
        await enqueue(nc.jetstream(), signed)
        await events.wait_for(lambda es: len(events.of(signed.message_id, DELIVERY)) == 3, within=90)

        arrived = [r for r in world.ok.received if signed.message_id in r.message_id]
        assert len(arrived) == 2  # one transaction per domain
        lookup = dkimpy_dns(world.dns)
        selectors = set(created.dkim_attributes.tokens)
        for received in arrived:
            assert received.data.count(b"DKIM-Signature:") == 2  # RSA and ed25519
            verifier = dkim.DKIM(received.data)
            assert verifier.verify(0, dnsfunc=lookup) and verifier.verify(1, dnsfunc=lookup)
            signatures = [
                value for name, value in received.message.items() if name.lower() == "dkim-signature"
            ]
            assert all("d=example.test" in s.replace(" ", "") for s in signatures)
            assert {s.replace(" ", "").split("s=")[1].split(";")[0] for s in signatures} == selectors

        # Turning DKIM off announces an IdentityChanged: workers drop their cached keys at once.
        assert mesh.server is not None
        delivery = mesh.server.services["sender"].delivery  # type: ignore[attr-defined]
        assert "example.test" in delivery.signing.domains()
        with mesh.client(key) as client:
            client.identity.PutEmailIdentityDkimAttributes(
                identity_pb2.PutEmailIdentityDkimAttributesRequest(
                    email_identity="example.test", signing_enabled=False
                )
            )
        await wait_until(lambda: "example.test" not in delivery.signing.domains(), what="the cache drop")
        unsigned = queued_message(account, ["plain@ok.test"])

        def delivered_unsigned() -> bool:
            return any(
                unsigned.message_id in r.message_id and b"DKIM-Signature" not in r.data
                for r in world.ok.received
            )

        await enqueue(nc.jetstream(), unsigned)
        await nc.close()
        await wait_until(delivered_unsigned, within=60, what="the unsigned message")


async def test_a_message_queued_once_skips_the_first_copy_ledger(
    start_mesh: MeshFactory, nats_url: str, world: World
) -> None:
    """A message accepted without a request_id (`queued_once`) cannot have a second queued copy, so
    the worker delivers it without recording it in the first-copy ledger; one that may (accepted with
    a request_id) is recorded under its stream sequence first. Both are delivered once."""
    start_mesh(("sender",), **_mx_settings(world))
    account = new_account_id()
    once = queued_message(account, ["once@ok.test"])
    once.queued_once = True
    keyed = queued_message(account, ["keyed@ok.test"])
    async with EmailEvents(nats_url, account) as events:
        nc = await nats.connect(nats_url)
        try:
            for message in (once, keyed):
                await enqueue(nc.jetstream(), message)
            await events.wait_for(
                lambda es: sum(1 for e in es if e.email.event_type == DELIVERY) >= 2, within=60
            )
            ledger = await queued_ledger(nc.jetstream())
            with pytest.raises(KeyNotFoundError):
                await ledger.get(once.message_id)
            recorded = await ledger.get(keyed.message_id)
            assert recorded.value is not None and int(recorded.value) > 0  # its stream sequence
        finally:
            await nc.close()
    assert len(events.of(once.message_id, DELIVERY)) == 1 and len(events.of(keyed.message_id, DELIVERY)) == 1
    assert sorted(r.recipients[0] for r in world.ok.received) == ["keyed@ok.test", "once@ok.test"]
