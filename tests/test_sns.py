"""Amazon SNS's HTTP/S format against a real consumer of SES-over-SNS notifications: django-ses's
event webhook in a small Django app on loopback, trusting postmesh's certificate host. It verifies the
signatures (fetching the certificate from postmesh's HTTPS endpoint), pins the TopicArn, and its
bounce and complaint handlers receive AWS's own example events."""

from __future__ import annotations

import base64
import json
import ssl
import sys
import threading
import time
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

import aiohttp
import pytest
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from postmesh.common.errors import InvalidArgument
from services.feedback.destinations.sns import (
    SnsFormat,
    SnsMessage,
    SnsSigner,
    string_to_sign,
    subscription_arn,
    topic_arn,
)
from services.feedback.destinations.sns_http import SnsEndpoint
from services.feedback.destinations.sns_keys import load_or_create

EXAMPLES = Path(__file__).resolve().parents[2] / "shared" / "ses-event-examples"
if not EXAMPLES.is_dir():  # a worktree beside the shared folder, or the repository inside it
    EXAMPLES = Path("/work/shared/ses-event-examples")

django = pytest.importorskip("django")
django_ses_available = pytest.importorskip("django_ses")


class Quiet(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass


class Received:
    """What django-ses's signals hand the application."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.bounces: list[dict[str, Any]] = []
        self.complaints: list[dict[str, Any]] = []

    def on_bounce(self, sender: Any, mail_obj: dict[str, Any], bounce_obj: dict[str, Any], **_: Any) -> None:
        with self.lock:
            self.bounces.append({"mail": mail_obj, "bounce": bounce_obj})

    def on_complaint(
        self, sender: Any, mail_obj: dict[str, Any], complaint_obj: dict[str, Any], **_: Any
    ) -> None:
        with self.lock:
            self.complaints.append({"mail": mail_obj, "complaint": complaint_obj})


TOPIC = topic_arn("postmesh", "acct0123456789", "marketing-events")


def _configure_django(trusted_host: str) -> None:
    from django.conf import settings
    from django.urls import path

    if not settings.configured:
        from django_ses.views import SESEventWebhookView

        urls = types.ModuleType("postmesh_sns_test_urls")
        urls.urlpatterns = [path("ses/events/", SESEventWebhookView.as_view())]  # type: ignore[attr-defined]
        sys.modules[urls.__name__] = urls
        settings.configure(
            DEBUG=False,
            SECRET_KEY="test",
            ALLOWED_HOSTS=["127.0.0.1", "localhost"],
            ROOT_URLCONF=urls.__name__,
            INSTALLED_APPS=[],
            DATABASES={},
            # What a django-ses user sets to take postmesh's notifications: trust its certificate host,
            # and pin the topic.
            AWS_SNS_EVENT_CERT_TRUSTED_DOMAINS=[trusted_host],
            AWS_SNS_EVENT_TRUSTED_TOPIC_ARNS=[TOPIC],
        )
        django.setup()


class Subscriptions:
    """The dispatcher's side of the handshake, as the endpoint sees it (the real store lives with the
    webhook dispatcher): one pending subscription."""

    def __init__(self, topic: str, token: str, subscription: str) -> None:
        self.pending = {(topic, token): subscription}
        self.confirmed: list[str] = []
        self.unsubscribed: list[str] = []

    async def confirm(self, topic: str, token: str) -> str | None:
        subscription = self.pending.get((topic, token))
        if subscription is not None:
            self.confirmed.append(subscription)
        return subscription

    async def unsubscribe(self, subscription: str) -> bool:
        if subscription in self.confirmed and subscription not in self.unsubscribed:
            self.unsubscribed.append(subscription)
            return True
        return False


@pytest.fixture
def django_app(monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[str, Received]]:
    _configure_django("localhost")
    from django.core.wsgi import get_wsgi_application
    from django_ses import signals, utils

    received = Received()
    signals.bounce_received.connect(received.on_bounce, weak=False)
    signals.complaint_received.connect(received.on_complaint, weak=False)
    utils.clear_cert_cache()
    server: WSGIServer = make_server("127.0.0.1", 0, get_wsgi_application(), handler_class=Quiet)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}/ses/events/", received
    finally:
        server.shutdown()
        server.server_close()
        signals.bounce_received.disconnect(received.on_bounce)
        signals.complaint_received.disconnect(received.on_complaint)


async def _post(http: aiohttp.ClientSession, url: str, message: SnsMessage) -> tuple[int, str]:
    async with http.post(url, data=message.json(), headers=message.headers) as reply:
        return reply.status, await reply.text()


def _example(name: str) -> str:
    return (EXAMPLES / name).read_text()


async def test_django_ses_verifies_and_handles_postmesh_sns_notifications(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, django_app: tuple[str, Received]
) -> None:
    webhook, received = django_app
    identity = load_or_create(host="localhost", data_dir=tmp_path)
    token = base64.b16encode(b"t" * 32).decode().lower()
    subscription = subscription_arn(TOPIC, "6f1c43f8-3a5e-4a4f-9d5e-3f7b8e0c1a2b")
    subscriptions = Subscriptions(TOPIC, token, subscription)
    endpoint = SnsEndpoint("127.0.0.1:0", identity, subscriptions)
    port = await endpoint.start()
    # django-ses fetches the certificate with requests, verifying TLS: the consumer trusts postmesh's
    # certificate (self-signed here; a CA-issued one needs nothing).
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(identity.cert_file))
    # django-ses compares the certificate URL's host *with its port* to the trusted domains: on 443 the
    # host alone is enough; this test's endpoint is on another port.
    from django.conf import settings

    monkeypatch.setattr(settings, "AWS_SNS_EVENT_CERT_TRUSTED_DOMAINS", [f"localhost:{port}"])
    base = f"https://localhost:{port}"
    sns = SnsFormat(signer=SnsSigner(identity.private_key, base + endpoint.cert_path), endpoint=base)
    trust = ssl.create_default_context(cafile=str(identity.cert_file))
    try:
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=trust)) as http:
            # The handshake: django-ses accepts the signed confirmation. (It fetches a SubscribeURL only
            # from sns.<region>.amazonaws.com, so with django-ses the subscription is confirmed by the
            # account or operator instead; any consumer that fetches the URL confirms it, as here.)
            confirmation = sns.subscription_confirmation(topic=TOPIC, token=token)
            assert confirmation.body["Type"] == "SubscriptionConfirmation"
            assert list(confirmation.body) == [
                "Type",
                "MessageId",
                "Token",
                "TopicArn",
                "Message",
                "SubscribeURL",
                "Timestamp",
                "SignatureVersion",
                "Signature",
                "SigningCertURL",
            ]
            assert await _post(http, webhook, confirmation) == (200, "")
            subscribe_url = confirmation.body["SubscribeURL"]
            assert subscribe_url.startswith(base + "/?Action=ConfirmSubscription&")
            async with http.get(subscribe_url) as reply:
                assert reply.status == 200
                assert f"<SubscriptionArn>{subscription}</SubscriptionArn>" in await reply.text()
            assert subscriptions.confirmed == [subscription]
            wrong = subscribe_url.replace(token, "0" * len(token))
            async with http.get(wrong) as reply:
                assert reply.status == 404 and "<Code>NotFound</Code>" in await reply.text()

            # Notifications: AWS's own example records, as the event JSON string in Message.
            bounce = sns.notification(
                topic=TOPIC, subscription=subscription, message=_example("event-bounce.json")
            )
            complaint = sns.notification(
                topic=TOPIC,
                subscription=subscription,
                message=_example("event-complaint.json"),
                subject="Amazon SES Email Event Notification",
            )
            assert "Subject" not in bounce.body and complaint.body["Subject"]
            assert bounce.headers["x-amz-sns-message-type"] == "Notification"
            assert bounce.headers["x-amz-sns-topic-arn"] == TOPIC
            assert bounce.headers["x-amz-sns-message-id"] == bounce.body["MessageId"]
            assert bounce.headers["Content-Type"] == "text/plain; charset=UTF-8"
            assert parse_qs(urlsplit(bounce.body["UnsubscribeURL"]).query)["SubscriptionArn"] == [
                subscription
            ]
            for message in (bounce, complaint):
                assert await _post(http, webhook, message) == (200, "")
            assert [b["bounce"] for b in received.bounces] == [
                json.loads(_example("event-bounce.json"))["bounce"]
            ]
            assert (
                received.bounces[0]["mail"]["messageId"]
                == json.loads(_example("event-bounce.json"))["mail"]["messageId"]
            )
            assert [c["complaint"] for c in received.complaints] == [
                json.loads(_example("event-complaint.json"))["complaint"]
            ]

            # What django-ses refuses: a tampered message, another topic, SHA256 (it checks version 1 only).
            tampered = SnsMessage(
                {**bounce.body, "Message": bounce.body["Message"].replace("bounce", "b0unce")}, bounce.headers
            )
            other = sns.notification(
                topic=topic_arn("postmesh", "acct0123456789", "other"),
                subscription=subscription,
                message="{}",
            )
            sha256 = sns.notification(
                topic=TOPIC, subscription=subscription, message="{}", signature_version=2
            )
            for refused in (tampered, other, sha256):
                status, _ = await _post(http, webhook, refused)
                assert status == 400
            assert len(received.bounces) == 1 and len(received.complaints) == 1

            # Version 2 is SHA256 over the same string, with the certificate at SigningCertURL.
            async with http.get(sha256.body["SigningCertURL"]) as reply:
                assert reply.status == 200
                certificate = x509.load_pem_x509_certificate(await reply.read())
            public = certificate.public_key()
            assert isinstance(public, rsa.RSAPublicKey)
            public.verify(
                base64.b64decode(sha256.body["Signature"]),
                string_to_sign(sha256.body),
                padding.PKCS1v15(),
                hashes.SHA256(),
            )
            assert sha256.body["SignatureVersion"] == "2"

            async with http.get(bounce.body["UnsubscribeURL"]) as reply:
                assert reply.status == 200 and "UnsubscribeResponse" in await reply.text()
            assert subscriptions.unsubscribed == [subscription]
            async with http.get(bounce.body["UnsubscribeURL"]) as reply:
                assert reply.status == 404
            # Then, as SNS does, an UnsubscribeConfirmation: signed like the handshake.
            goodbye = sns.unsubscribe_confirmation(topic=TOPIC, token=token)
            assert goodbye.body["Type"] == "UnsubscribeConfirmation"
            assert goodbye.body["SubscribeURL"] == subscribe_url  # visiting it subscribes again
            assert await _post(http, webhook, goodbye) == (200, "")
    finally:
        await endpoint.stop()


def test_string_to_sign_follows_sns_field_order_and_skips_a_missing_subject() -> None:
    message = {
        "Type": "Notification",
        "MessageId": "id",
        "TopicArn": "arn",
        "Message": "m",
        "Timestamp": "2026-01-01T00:00:00.000Z",
    }
    expected = b"Message\nm\nMessageId\nid\nTimestamp\n2026-01-01T00:00:00.000Z\nTopicArn\narn\n"
    assert string_to_sign(message) == expected + b"Type\nNotification\n"
    with_subject = string_to_sign({**message, "Subject": "s"})
    assert with_subject.startswith(b"Message\nm\nMessageId\nid\nSubject\ns\nTimestamp")
    with pytest.raises(ValueError):
        string_to_sign({**message, "Type": "Other"})
    with pytest.raises(ValueError):
        string_to_sign({"Type": "SubscriptionConfirmation", "Message": "m"})


def test_topic_arns_are_stable_and_names_checked(tmp_path: Path) -> None:
    assert topic_arn("postmesh", "acct1", "events") == "arn:postmesh:sns:postmesh:acct1:events"
    assert topic_arn("postmesh", "acct1", "events").split(":")[5] == "events"
    for bad in ("", "has space", "a:b", "x" * 257, "é"):
        with pytest.raises(InvalidArgument):
            topic_arn("postmesh", "acct1", bad)
    with pytest.raises(InvalidArgument):
        topic_arn("post:mesh", "acct1", "events")
    identity = load_or_create(host="sns.postmesh.test", data_dir=tmp_path)
    again = load_or_create(host="sns.postmesh.test", data_dir=tmp_path)
    assert again.cert_id == identity.cert_id  # kept, so SigningCertURL stays valid across restarts
    assert (identity.key_file.stat().st_mode & 0o077) == 0
    assert (
        load_or_create(
            host="x", data_dir=tmp_path, cert_file=str(identity.cert_file), key_file=str(identity.key_file)
        ).cert_id
        == identity.cert_id
    )
    with pytest.raises(ValueError):
        load_or_create(host="x", data_dir=tmp_path, cert_file=str(identity.cert_file))
    other = load_or_create(host="other", data_dir=tmp_path / "other")
    with pytest.raises(ValueError):
        load_or_create(
            host="x", data_dir=tmp_path, cert_file=str(identity.cert_file), key_file=str(other.key_file)
        )
    signer = SnsSigner(identity.private_key, "https://sns.postmesh.test/cert.pem")
    with pytest.raises(ValueError):
        SnsFormat(signer=signer, endpoint="http://sns.postmesh.test")
    with pytest.raises(InvalidArgument):
        SnsFormat(signer=signer, endpoint="https://sns.postmesh.test").notification(
            topic="arn", subscription="arn:s", message="{}", signature_version=3
        )


# ---- end to end: a configuration set's SNS-format destinations in a real mesh ------------------------

SIMULATOR = "simulator.postmesh.test"


def _sns_send(client: Any, to: str) -> str:
    from postmesh.sender.v1 import sender_pb2 as pb

    return str(
        client.sender.SendEmail(
            pb.SendEmailRequest(
                from_email_address="news@example.test",
                destination=pb.Destination(to_addresses=[to]),
                configuration_set_name="app",
                content=pb.EmailContent(
                    simple=pb.Message(subject=pb.Content(data="Hi"), body=pb.Body(text=pb.Content(data="Hi")))
                ),
            )
        ).message_id
    )


def _sns_destination(url: str, version: int, *types: Any) -> Any:
    from postmesh.feedback.v1 import configuration_sets_pb2 as cs

    return cs.EventDestinationDefinition(
        enabled=True,
        matching_event_types=list(types),
        webhook=cs.WebhookDestination(url=url, format=cs.WEBHOOK_FORMAT_SNS, signature_version=version),
    )


def _wait(done: Any, within: float = 60.0) -> None:
    deadline = time.monotonic() + within
    while not done():
        assert time.monotonic() < deadline, "never happened"
        time.sleep(0.1)


def _sns_verified(body: dict[str, str], http: Any) -> bool:
    """Verifies an SNS message as SNS's own consumers do: the certificate from SigningCertURL."""
    certificate = x509.load_pem_x509_certificate(http.get(body["SigningCertURL"], timeout=30).content)
    public = certificate.public_key()
    assert isinstance(public, rsa.RSAPublicKey)
    digest = hashes.SHA1() if body["SignatureVersion"] == "1" else hashes.SHA256()
    try:
        public.verify(base64.b64decode(body["Signature"]), string_to_sign(body), padding.PKCS1v15(), digest)
    except InvalidSignature:
        return False
    return True


def test_a_set_with_sns_destinations_reaches_django_ses_once_confirmed(
    start_mesh: Any, monkeypatch: pytest.MonkeyPatch, django_app: tuple[str, Received]
) -> None:
    """django-ses's event webhook as a configuration set's SNS destination: created pending, confirmed
    with the RPC (django-ses fetches SubscribeURL only from AWS), then the mailbox simulator's bounce@
    and complaint@ reach its bounce and complaint handlers, signatures verified against postmesh's
    certificate and the TopicArn pinned. Beside it, a plain endpoint sees the protocol itself: the
    SubscriptionConfirmation first, nothing before its SubscribeURL is fetched, SignatureVersion 2, and
    the UnsubscribeURL ending the subscription."""
    import requests

    from postmesh.common.natsserver import free_port
    from postmesh.events.v1 import events_pb2 as ev
    from postmesh.feedback.v1 import configuration_sets_pb2 as cs
    from postmesh.testing_mail import LoopbackDns
    from tests.destinations_helpers import WebhookReceiver
    from tests.identity_helpers import create_verified_domain

    webhook, received = django_app
    plain, probe = WebhookReceiver().start(), WebhookReceiver().start()
    sns_port = free_port()
    with LoopbackDns() as zone:
        mesh = start_mesh(
            dns_resolver=zone.address,
            dns_check_poll_seconds=3600,
            dns_timeout_seconds=2,
            sns_https_listen=f"127.0.0.1:{sns_port}",
            sns_cert_host="localhost",
            webhook_allow_private_targets=True,
            webhook_backoff_seconds=0.2,
            webhook_backoff_max_seconds=1.0,
            webhook_poll_seconds=0.2,
            sandbox_max_send_rate=1000.0,
            delivery_workers=2,
        )
        account_id, key = mesh.create_account()
        identity = load_or_create(host="localhost", data_dir=Path(mesh.settings.data_dir))
        # What a django-ses user sets: trust postmesh's certificate (self-signed here) and its host.
        monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(identity.cert_file))
        from django.conf import settings

        monkeypatch.setattr(settings, "AWS_SNS_EVENT_CERT_TRUSTED_DOMAINS", [f"localhost:{sns_port}"])
        topic = f"arn:postmesh:sns:postmesh:{account_id}:app-django"  # stable: pinned before it exists
        monkeypatch.setattr(settings, "AWS_SNS_EVENT_TRUSTED_TOPIC_ARNS", [topic])
        http = requests.Session()
        http.verify = str(identity.cert_file)
        with mesh.client(key) as client:
            feedback = client.feedback
            create_verified_domain(client, zone, "example.test")
            feedback.CreateConfigurationSet(cs.CreateConfigurationSetRequest(configuration_set_name="app"))
            bounce_and_complaint = (ev.EMAIL_EVENT_TYPE_BOUNCE, ev.EMAIL_EVENT_TYPE_COMPLAINT)
            for name, url, version in (("django", webhook, 0), ("plain", plain.url, 2)):
                feedback.CreateConfigurationSetEventDestination(
                    cs.CreateConfigurationSetEventDestinationRequest(
                        configuration_set_name="app",
                        event_destination_name=name,
                        event_destination=_sns_destination(url, version, *bounce_and_complaint),
                    )
                )
            shown = {
                d.name: d.webhook
                for d in feedback.GetConfigurationSetEventDestinations(
                    cs.GetConfigurationSetEventDestinationsRequest(configuration_set_name="app")
                ).event_destinations
            }
            assert shown["django"].topic_arn == topic and shown["plain"].topic_arn.endswith(":app-plain")
            assert (shown["django"].signature_version, shown["plain"].signature_version) == (1, 2)
            for destination in shown.values():
                assert destination.subscription_status == cs.SUBSCRIPTION_STATUS_PENDING_CONFIRMATION
                assert destination.subscription_arn == ""

            # The plain endpoint: the handshake first, signed (version 2) with the served certificate.
            handshake = json.loads(plain.wait_for(lambda d: len(d) >= 1)[0].body)
            assert handshake["Type"] == "SubscriptionConfirmation"
            assert handshake["TopicArn"] == shown["plain"].topic_arn
            assert handshake["SignatureVersion"] == "2" and _sns_verified(handshake, http)
            # Sent while no one is subscribed: once a JSON destination of the same set has its bounce,
            # the router has passed the SNS ones by.
            feedback.CreateConfigurationSetEventDestination(
                cs.CreateConfigurationSetEventDestinationRequest(
                    configuration_set_name="app",
                    event_destination_name="probe",
                    event_destination=cs.EventDestinationDefinition(
                        enabled=True,
                        matching_event_types=[ev.EMAIL_EVENT_TYPE_BOUNCE],
                        webhook=cs.WebhookDestination(url=probe.url),
                    ),
                )
            )
            early = _sns_send(client, f"bounce@{SIMULATOR}")
            assert early in probe.wait_for(lambda d: len(d) >= 1)[0].body.decode()

            arn = feedback.ConfirmConfigurationSetEventDestination(
                cs.ConfirmConfigurationSetEventDestinationRequest(
                    configuration_set_name="app", event_destination_name="django"
                )
            ).subscription_arn
            assert arn.startswith(topic + ":")
            reply = http.get(handshake["SubscribeURL"], timeout=30)
            assert reply.status_code == 200 and "<SubscriptionArn>" in reply.text
            plain_arn = reply.text.split("<SubscriptionArn>")[1].split("<")[0]
            for destination in feedback.GetConfigurationSetEventDestinations(
                cs.GetConfigurationSetEventDestinationsRequest(configuration_set_name="app")
            ).event_destinations:
                if destination.name == "probe":
                    continue
                assert destination.webhook.subscription_status == cs.SUBSCRIPTION_STATUS_CONFIRMED
                assert (
                    destination.webhook.subscription_arn
                    == {"django": arn, "plain": plain_arn}[destination.name]
                )

            bounced = _sns_send(client, f"bounce@{SIMULATOR}")
            complained = _sns_send(client, f"complaint@{SIMULATOR}")
            _wait(lambda: received.bounces and received.complaints)
            assert [b["mail"]["messageId"] for b in received.bounces] == [bounced]
            assert received.bounces[0]["bounce"]["bounceType"] == "Permanent"
            assert (
                received.bounces[0]["bounce"]["bouncedRecipients"][0]["emailAddress"] == f"bounce@{SIMULATOR}"
            )
            assert [c["mail"]["messageId"] for c in received.complaints] == [complained]
            assert received.complaints[0]["complaint"]["complainedRecipients"] == [
                {"emailAddress": f"complaint@{SIMULATOR}"}
            ]
            assert received.complaints[0]["mail"]["tags"]["ses:configuration-set"] == ["app"]

            # The plain endpoint got the same two events, as Notifications, and nothing from before.
            notes = [json.loads(d.body) for d in plain.wait_for(lambda d: len(d) >= 3)[1:]]
            assert [n["Type"] for n in notes] == ["Notification", "Notification"]
            messages = [json.loads(n["Message"]) for n in notes]
            assert {(m["mail"]["messageId"], m["eventType"]) for m in messages} == {
                (bounced, "Bounce"),
                (complained, "Complaint"),
            }
            assert early not in {m["mail"]["messageId"] for m in messages}
            for note in notes:
                assert note["TopicArn"] == shown["plain"].topic_arn and _sns_verified(note, http)
                assert not _sns_verified({**note, "Message": note["Message"].replace("o", "0")}, http)

            # The UnsubscribeURL ends it: pending again, told so, and nothing more is sent.
            reply = http.get(notes[0]["UnsubscribeURL"], timeout=30)
            assert reply.status_code == 200 and "UnsubscribeResponse" in reply.text
            assert http.get(notes[0]["UnsubscribeURL"], timeout=30).status_code == 404
            goodbye = json.loads(plain.wait_for(lambda d: len(d) >= 4)[3].body)
            assert goodbye["Type"] == "UnsubscribeConfirmation" and _sns_verified(goodbye, http)
            shown = {
                d.name: d.webhook
                for d in feedback.GetConfigurationSetEventDestinations(
                    cs.GetConfigurationSetEventDestinationsRequest(configuration_set_name="app")
                ).event_destinations
            }
            assert shown["plain"].subscription_status == cs.SUBSCRIPTION_STATUS_PENDING_CONFIRMATION
            last = _sns_send(client, f"bounce@{SIMULATOR}")
            _wait(lambda: len(received.bounces) == 2)
            assert received.bounces[1]["mail"]["messageId"] == last
            assert len(plain.deliveries) == 4
    plain.stop()
    probe.stop()
