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
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

import aiohttp
import pytest
from cryptography import x509
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
