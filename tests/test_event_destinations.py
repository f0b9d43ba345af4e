"""Event destinations end to end: a real mesh delivering over SMTP to aiosmtpd on loopback, webhooks
received by a real HTTP server, and the SubscribeEvents stream read by a real gRPC client."""

from __future__ import annotations

import asyncio
import http.client
import json
import re
import time
from collections.abc import Iterator
from pathlib import Path

import dkim
import grpc
import pytest

from postmesh.client import Client
from postmesh.common.bus import EventPublisher, new_event
from postmesh.common.natsserver import free_port
from postmesh.events.v1 import events_pb2 as ev
from postmesh.feedback.v1 import configuration_sets_pb2 as cs
from postmesh.identity.v1 import identity_pb2
from postmesh.sender.v1 import queue_pb2
from postmesh.sender.v1 import sender_pb2 as pb
from postmesh.testing import MeshThread
from postmesh.testing_mail import Behaviour, LoopbackDns, SmtpServer
from services.feedback.destinations.signing import verify
from tests.conftest import MeshFactory
from tests.delivery_helpers import EmailEvents
from tests.destinations_helpers import Delivery, Follower, WebhookReceiver, webhook
from tests.dkim_verifiers import dkimpy_dns
from tests.identity_helpers import create_verified_domain, mail_to
from tests.sending_helpers import own_nats_server, refusal

SEND, DELIVERY, BOUNCE = ev.EMAIL_EVENT_TYPE_SEND, ev.EMAIL_EVENT_TYPE_DELIVERY, ev.EMAIL_EVENT_TYPE_BOUNCE
COMPLAINT = ev.EMAIL_EVENT_TYPE_COMPLAINT


@pytest.fixture
def zone() -> Iterator[LoopbackDns]:
    with LoopbackDns() as server:
        yield server


@pytest.fixture
def nats_url(tmp_path: Path) -> Iterator[str]:
    with own_nats_server(tmp_path / "nats") as url:
        yield url


def _send(client: Client, sender: str, to: str, configuration_set: str) -> str:
    return client.sender.SendEmail(
        pb.SendEmailRequest(
            from_email_address=sender,
            destination=pb.Destination(to_addresses=[to]),
            configuration_set_name=configuration_set,
            email_tags=[pb.MessageTag(name="campaign", value="winter")],
            content=pb.EmailContent(
                simple=pb.Message(subject=pb.Content(data="Hello"), body=pb.Body(text=pb.Content(data="Hi")))
            ),
        )
    ).message_id


def _set_with_webhook(client: Client, url: str) -> str:
    client.feedback.CreateConfigurationSet(cs.CreateConfigurationSetRequest(configuration_set_name="app"))
    return client.feedback.CreateConfigurationSetEventDestination(
        cs.CreateConfigurationSetEventDestinationRequest(
            configuration_set_name="app",
            event_destination_name="hook",
            event_destination=webhook(url, SEND, DELIVERY, BOUNCE, COMPLAINT),
        )
    ).signing_secret


def _identity_notifications(client: Client) -> None:
    identity = client.identity

    def topic(destination: str, kind: int = identity_pb2.NOTIFICATION_TYPE_BOUNCE) -> object:
        return identity.SetIdentityNotificationTopic(
            identity_pb2.SetIdentityNotificationTopicRequest(
                identity="example.test",
                notification_type=kind,  # type: ignore[arg-type]
                destination=destination,
            )
        )

    assert refusal(lambda: topic("no-slash"))[0] == grpc.StatusCode.INVALID_ARGUMENT
    assert refusal(lambda: topic("app/missing"))[0] == grpc.StatusCode.NOT_FOUND
    assert refusal(lambda: topic("nope/hook"))[0] == grpc.StatusCode.NOT_FOUND
    assert refusal(lambda: topic("app/hook", 9))[0] == grpc.StatusCode.INVALID_ARGUMENT
    forwarding_off = identity_pb2.SetIdentityFeedbackForwardingEnabledRequest(
        identity="example.test", forwarding_enabled=False
    )
    code, _, _, metadata = refusal(lambda: identity.SetIdentityFeedbackForwardingEnabled(forwarding_off))
    assert (code, metadata["field"]) == (grpc.StatusCode.INVALID_ARGUMENT, "forwarding_enabled")
    topic("app/hook")
    identity.SetIdentityHeadersInNotificationsEnabled(
        identity_pb2.SetIdentityHeadersInNotificationsEnabledRequest(
            identity="example.test", notification_type=identity_pb2.NOTIFICATION_TYPE_BOUNCE, enabled=True
        )
    )
    shown = identity.GetIdentityNotificationAttributes(
        identity_pb2.GetIdentityNotificationAttributesRequest(identities=["example.test", "not-mine.test"])
    ).notification_attributes
    assert list(shown) == ["example.test"]
    assert shown["example.test"].bounce_destination == "app/hook"
    assert shown["example.test"].headers_in_bounce_notifications_enabled
    # Never chosen: FEEDBACK_FORWARDING_DEFAULT, which MeshThread sets to false.
    assert not shown["example.test"].forwarding_enabled and not shown["example.test"].complaint_destination


def _records(deliveries: list[Delivery], secret: str) -> list[dict[str, object]]:
    records = []
    for delivery in deliveries:
        assert delivery.headers["Content-Type"] == "application/json"
        assert verify(secret, delivery.headers["X-Postmesh-Signature"], delivery.body, now=int(time.time()))
        records.append(json.loads(delivery.body))
    return records


def _mesh(start_mesh: MeshFactory, zone: LoopbackDns, port: int, **extra: object) -> MeshThread:
    return start_mesh(
        sandbox_max_send_rate=1000.0,
        dns_resolver=zone.address,
        dns_check_poll_seconds=3600,
        dns_timeout_seconds=2,
        delivery_mode="mx",
        delivery_workers=2,
        smtp_port=port,
        smtp_helo_name="out.postmesh.test",
        webhook_allow_private_targets=True,
        webhook_backoff_seconds=0.2,
        webhook_backoff_max_seconds=1.0,
        webhook_poll_seconds=0.2,
        event_subscription_ack_wait_seconds=5.0,
        **extra,
    )


def test_webhook_and_stream_receive_send_delivery_and_bounce_of_their_own_account_only(
    start_mesh: MeshFactory, zone: LoopbackDns, nats_url: str
) -> None:
    port = free_port("127.0.0.2")
    behaviour = Behaviour(reject={"nobody@example.test": "550 5.1.1 User unknown"})
    receiver, other_receiver = WebhookReceiver(), WebhookReceiver().start()
    with SmtpServer("127.0.0.2", port, behaviour=behaviour):
        for domain in ("example.test", "other.test"):
            zone.add_mx(domain, "mx.example.test", 10)
        zone.add_a("mx.example.test", "127.0.0.2")
        mesh = _mesh(start_mesh, zone, port)
        account_id, key = mesh.create_account()
        other_id, other_key = mesh.create_account("other")
        with mesh.client(key) as client, mesh.client(other_key) as other:
            create_verified_domain(client, zone, "example.test")
            create_verified_domain(other, zone, "other.test")
            # The receiver is down when the events happen: they wait and arrive once it is up.
            secret = _set_with_webhook(client, receiver.url)
            other_secret = _set_with_webhook(other, other_receiver.url)
            # SES v1 identity notifications: the identity's bounces also go to the webhook, as notifications.
            _identity_notifications(client)
            follower = Follower(client, "app-events")
            other_follower = Follower(other, "app-events")  # the same name in another account

            delivered = _send(client, "News <news@example.test>", "ok@example.test", "app")
            bounced = _send(client, "news@example.test", "nobody@example.test", "app")
            theirs = _send(other, "x@other.test", "ok@other.test", "app")

            # The stream: take two, acknowledge one, leave; come back for the rest and the unacknowledged one.
            first = follower.wait_for(2)
            assert len(first) >= 2
            follower.ack(first[0].event.event_id)
            time.sleep(0.5)  # let the acknowledgement through before leaving (it is not asserted on)
            follower.close()
            back = Follower(client, "app-events")
            wanted = {(delivered, SEND), (delivered, DELIVERY), (bounced, SEND), (bounced, BOUNCE)}
            deadline = time.monotonic() + 60
            seen: set[tuple[str, int]] = {
                (first[0].event.email.mail.message_id, first[0].event.email.event_type)
            }
            while time.monotonic() < deadline and not wanted <= seen:
                for response in back.events():
                    seen.add((response.event.email.mail.message_id, response.event.email.event_type))
                    back.ack(response.event.event_id)
                time.sleep(0.2)
            assert wanted <= seen
            assert first[1].event.event_id in {r.event.event_id for r in back.events()}  # not acknowledged
            for response in back.events():
                assert response.event.account_id == account_id
                assert (
                    json.loads(response.ses_json)["mail"]["messageId"] == response.event.email.mail.message_id
                )
            # A complaint about the delivered message, as the feedback loop publishes it.
            delivered_mail = next(
                r.event.email.mail for r in back.events() if r.event.email.event_type == DELIVERY
            )
            back.close()
            complaint = new_event(
                account_id,
                email=ev.EmailEvent(
                    event_type=COMPLAINT,
                    mail=delivered_mail,
                    complaint=ev.Complaint(
                        complained_recipients=[ev.ComplainedRecipient(email_address="ok@example.test")],
                        feedback_id="fb-1",
                        complaint_feedback_type="abuse",
                        user_agent="Mail reporter",
                    ),
                ),
            )
            complaint.email.complaint.timestamp.GetCurrentTime()
            complaint.email.complaint.arrival_date.GetCurrentTime()
            assert mesh.server is not None and mesh.server.nats is not None
            mesh.run(EventPublisher(mesh.server.nats.jetstream()).publish(complaint))

            time.sleep(1.0)  # a few failed attempts while the receiver is down
            receiver.start()
            try:
                everything = _records(receiver.wait_for(lambda d: len(d) >= 6), secret)
            finally:
                receiver.stop()
            notifications = [r for r in everything if "notificationType" in r]
            records = [r for r in everything if "eventType" in r]
            assert [n["notificationType"] for n in notifications] == ["Bounce"]
            notification = notifications[0]
            assert notification["mail"]["messageId"] == bounced  # type: ignore[index]
            assert "tags" not in notification["mail"]  # type: ignore[operator]
            assert notification["bounce"]["bouncedRecipients"][0]["emailAddress"] == "nobody@example.test"  # type: ignore[index]
            by_kind = {(r["mail"]["messageId"], r["eventType"]) for r in records}  # type: ignore[index]
            assert by_kind >= {
                (delivered, "Send"),
                (delivered, "Delivery"),
                (bounced, "Send"),
                (bounced, "Bounce"),
                (delivered, "Complaint"),
            }
            for record in records:
                mail = record["mail"]
                assert isinstance(mail, dict)
                assert mail["sendingAccountId"] == account_id
                assert mail["tags"]["ses:configuration-set"] == ["app"]
                assert mail["tags"]["campaign"] == ["winter"]
                assert mail["tags"]["ses:from-domain"] == ["example.test"]
                assert isinstance(mail["headersTruncated"], bool)
                assert mail["commonHeaders"]["messageId"] == mail["messageId"]
            bounce = next(r for r in records if r["eventType"] == "Bounce")["bounce"]
            assert isinstance(bounce, dict)
            assert bounce["bounceType"] == "Permanent"
            assert bounce["bouncedRecipients"][0]["emailAddress"] == "nobody@example.test"
            assert bounce["bouncedRecipients"][0]["status"] == "5.1.1"
            assert bounce["timestamp"].endswith("Z") and len(bounce["timestamp"]) == 24
            complained = next(r for r in records if r["eventType"] == "Complaint")["complaint"]
            assert isinstance(complained, dict)
            assert complained["complainedRecipients"] == [{"emailAddress": "ok@example.test"}]
            assert complained["complaintFeedbackType"] == "abuse" and complained["feedbackId"] == "fb-1"
            assert complained["arrivalDate"].endswith("Z") and complained["userAgent"] == "Mail reporter"
            delivery = next(r for r in records if r["eventType"] == "Delivery")["delivery"]
            assert isinstance(delivery, dict)
            assert delivery["recipients"] == ["ok@example.test"]
            assert isinstance(delivery["processingTimeMillis"], int)
            assert delivery["smtpResponse"].startswith("250")

            # The other account: its own events only, on its webhook and its stream.
            other_records = _records(other_receiver.wait_for(lambda d: len(d) >= 2), other_secret)
            assert {r["mail"]["messageId"] for r in other_records} == {theirs}  # type: ignore[index]
            assert all(r["mail"]["messageId"] != theirs for r in records)  # type: ignore[index]
            other_events = other_follower.wait_for(2)
            assert {r.event.account_id for r in other_events} == {other_id}
            other_follower.close()
    other_receiver.stop()


def test_tls_required_by_the_set_is_never_delivered_in_plain_text(
    start_mesh: MeshFactory, zone: LoopbackDns, nats_url: str
) -> None:
    """The receiving server offers no STARTTLS: no delivery; a DeliveryDelay, then a bounce when the
    message expires (as SES does), each carrying the set's name."""
    port = free_port("127.0.0.2")
    with SmtpServer("127.0.0.2", port) as smtp:
        zone.add_mx("example.test", "mx.example.test", 10)
        zone.add_a("mx.example.test", "127.0.0.2")
        mesh = _mesh(
            start_mesh,
            zone,
            port,
            retry_base_minutes=0.01,
            retry_max_minutes=0.02,
            delivery_max_age_hours=0.003,
        )
        account_id, key = mesh.create_account()
        with mesh.client(key) as client:
            create_verified_domain(client, zone, "example.test")
            client.feedback.CreateConfigurationSet(
                cs.CreateConfigurationSetRequest(
                    configuration_set_name="secure",
                    delivery_options=cs.DeliveryOptions(tls_policy=queue_pb2.TLS_POLICY_REQUIRE),
                )
            )

            async def watch() -> list[ev.EmailEvent]:
                async with EmailEvents(mesh.settings.nats_url, account_id) as events:
                    message_id = _send(client, "news@example.test", "ok@example.test", "secure")
                    await events.wait_for(lambda _: bool(events.of(message_id, BOUNCE)), within=90)
                    return events.of(message_id)

            received = asyncio.run(watch())
        kinds = [e.event_type for e in received]
        assert ev.EMAIL_EVENT_TYPE_DELIVERY_DELAY in kinds and BOUNCE in kinds
        assert DELIVERY not in kinds
        assert all(e.mail.configuration_set_name == "secure" for e in received)
        assert smtp.received == []


def _send_html(client: Client, to: str, configuration_set: str) -> str:
    html = '<html><body><p>Hello</p><a href="https://shop.example.test/spring?a=1&amp;b=2">Shop</a></body></html>'
    return client.sender.SendEmail(
        pb.SendEmailRequest(
            from_email_address="news@example.test",
            destination=pb.Destination(to_addresses=[to]),
            configuration_set_name=configuration_set,
            content=pb.EmailContent(
                simple=pb.Message(
                    subject=pb.Content(data="Offer"),
                    body=pb.Body(text=pb.Content(data="Hello"), html=pb.Content(data=html)),
                )
            ),
        )
    ).message_id


def test_a_set_publishing_opens_and_clicks_tracks_its_mail_and_the_webhook_gets_them(
    start_mesh: MeshFactory, zone: LoopbackDns, nats_url: str
) -> None:
    """As SES: a set with an enabled destination for OPEN and CLICK gets the pixel and tracked links
    (on its CustomRedirectDomain when it has one); a set without gets neither. The delivered message's
    link and pixel, fetched over HTTP, reach the webhook as SES's Open and Click records, signed, and
    the message's DKIM signature still verifies."""
    port = free_port("127.0.0.2")
    receiver, others = WebhookReceiver().start(), WebhookReceiver().start()
    listen = f"127.0.0.1:{free_port()}"
    with SmtpServer("127.0.0.2", port) as smtp:
        zone.add_mx("example.test", "mx.example.test", 10)
        zone.add_a("mx.example.test", "127.0.0.2")
        mesh = _mesh(
            start_mesh, zone, port, tracking_secret="wiring-test-secret", tracking_http_listen=listen
        )
        _, key = mesh.create_account()
        with mesh.client(key) as client:
            create_verified_domain(client, zone, "example.test")
            for name in ("app", "plain", "branded"):
                client.feedback.CreateConfigurationSet(
                    cs.CreateConfigurationSetRequest(configuration_set_name=name)
                )
            secret = client.feedback.CreateConfigurationSetEventDestination(
                cs.CreateConfigurationSetEventDestinationRequest(
                    configuration_set_name="app",
                    event_destination_name="engagement",
                    event_destination=webhook(
                        receiver.url, ev.EMAIL_EVENT_TYPE_OPEN, ev.EMAIL_EVENT_TYPE_CLICK
                    ),
                )
            ).signing_secret
            secrets = {}
            for name, types, enabled in (
                ("plain", (DELIVERY,), True),
                ("plain", (ev.EMAIL_EVENT_TYPE_OPEN,), False),
                ("branded", (ev.EMAIL_EVENT_TYPE_CLICK,), True),
            ):
                destination = f"{name}-{types[0]}"
                secrets[destination] = client.feedback.CreateConfigurationSetEventDestination(
                    cs.CreateConfigurationSetEventDestinationRequest(
                        configuration_set_name=name,
                        event_destination_name=destination,
                        event_destination=webhook(others.url + "/" + destination, *types, enabled=enabled),
                    )
                ).signing_secret
            client.feedback.PutConfigurationSetTrackingOptions(
                cs.PutConfigurationSetTrackingOptionsRequest(
                    configuration_set_name="branded", custom_redirect_domain="click.example.test"
                )
            )
            tracked = _send_html(client, "reader@example.test", "app")
            plain = _send_html(client, "plain@example.test", "plain")
            branded = _send_html(client, "branded@example.test", "branded")
            html = {
                to: mail_to(smtp, to).message
                for to in ("reader@example.test", "plain@example.test", "branded@example.test")
            }
            for message in html.values():
                data = message.as_bytes()
                assert b"DKIM-Signature:" in data and dkim.DKIM(data).verify(dnsfunc=dkimpy_dns(zone))

            def body(to: str) -> str:
                part = next(p for p in html[to].walk() if p.get_content_type() == "text/html")
                payload = part.get_payload(decode=True)
                assert isinstance(payload, bytes)
                return payload.decode()

            base = f"http://{listen}"
            links = re.findall(re.escape(base) + r"/c/[A-Za-z0-9_.\-]+", body("reader@example.test"))
            pixels = re.findall(re.escape(base) + r"/o/[A-Za-z0-9_.\-]+", body("reader@example.test"))
            assert len(links) == 1 and len(pixels) == 1
            assert "/c/" not in body("plain@example.test") and "/o/" not in body("plain@example.test")
            assert "https://shop.example.test/spring" in body("plain@example.test")
            branded_links = re.findall(
                r"http://click\.example\.test/c/[A-Za-z0-9_.\-]+", body("branded@example.test")
            )
            assert len(branded_links) == 1 and "/o/" not in body("branded@example.test")

            agent = "Mozilla/5.0 (postmesh wiring test)"
            shop = "https://shop.example.test/spring?a=1&b=2"
            branded_link = branded_links[0].replace("http://click.example.test", base)
            for url, status in ((links[0], 302), (pixels[0], 200), (branded_link, 302)):
                assert _fetch(url, agent) == (status, shop if status == 302 else None)
            records = _records(receiver.wait_for(lambda d: len(d) >= 2, within=60), secret)
            # The plain set's Delivery (the destination for OPEN is disabled) and the branded Click.
            other = others.wait_for(lambda d: len(d) >= 2, within=60)
            for delivery in other:
                assert _records([delivery], secrets[delivery.path.rsplit("/", 1)[1]])
    receiver.stop()
    others.stop()
    by_kind = {(r["mail"]["messageId"], r["eventType"]): r for r in records}  # type: ignore[index]
    assert set(by_kind) == {(tracked, "Click"), (tracked, "Open")}
    other_kinds = {(r["mail"]["messageId"], r["eventType"]) for r in map(json.loads, (d.body for d in other))}
    assert other_kinds == {(plain, "Delivery"), (branded, "Click")}
    click = by_kind[(tracked, "Click")]["click"]
    opened = by_kind[(tracked, "Open")]["open"]
    assert isinstance(click, dict) and isinstance(opened, dict)
    assert click["link"] == "https://shop.example.test/spring?a=1&b=2" and click["linkTags"] == {}
    assert click["userAgent"] == agent == opened["userAgent"]
    assert click["ipAddress"] == "127.0.0.1" == opened["ipAddress"]
    assert click["timestamp"].endswith("Z") and opened["timestamp"].endswith("Z")
    mail = by_kind[(tracked, "Open")]["mail"]
    assert isinstance(mail, dict) and mail["tags"]["ses:configuration-set"] == ["app"]
    assert mail["destination"] == ["reader@example.test"]


def _fetch(url: str, agent: str) -> tuple[int, str | None]:
    """GET without following redirects: the status and the Location."""
    host, _, path = url.removeprefix("http://").partition("/")
    connection = http.client.HTTPConnection(host, timeout=30)
    try:
        connection.request("GET", "/" + path, headers={"User-Agent": agent})
        reply = connection.getresponse()
        reply.read()
        return reply.status, reply.getheader("Location")
    finally:
        connection.close()
