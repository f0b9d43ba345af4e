"""Amazon SNS's HTTP/S delivery format, so applications written for SES-over-SNS notifications take
postmesh's events unchanged: the JSON envelopes (Notification, SubscriptionConfirmation,
UnsubscribeConfirmation), the headers SNS sends with them, and their signatures.

The webhook dispatcher calls this library: it keeps each SNS-format destination's topic name,
subscription id, confirmation token and signature version, posts what `notification()` and
`subscription_confirmation()` build, and answers the SubscribeURL and UnsubscribeURL through the
`SubscriptionCallbacks` it gives the HTTPS endpoint (see sns_http.py).

Signatures are made exactly as SNS makes them: the fields of the message type in SNS's documented
order, each as "Name\\nValue\\n" (a Notification's Subject only when it has one), signed with
RSA PKCS#1 v1.5 and SHA1 (SignatureVersion 1, which many consumers insist on) or SHA256 (2), with the
key whose certificate is served at SigningCertURL.
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import re
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol
from urllib.parse import urlencode

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from postmesh.common.errors import InvalidArgument

SIGNATURE_VERSIONS = (1, 2)
_HASHES: dict[int, Callable[[], hashes.HashAlgorithm]] = {1: hashes.SHA1, 2: hashes.SHA256}
# SNS's own topic name rule.
_TOPIC_NAME = re.compile(r"^[A-Za-z0-9_-]{1,256}$")
_ARN_PART = re.compile(r"^[A-Za-z0-9_-]{1,64}$")

NOTIFICATION = "Notification"
SUBSCRIPTION_CONFIRMATION = "SubscriptionConfirmation"
UNSUBSCRIBE_CONFIRMATION = "UnsubscribeConfirmation"

_HANDSHAKE_FIELDS = ("Message", "MessageId", "SubscribeURL", "Timestamp", "Token", "TopicArn", "Type")
_SIGNED_FIELDS = {
    NOTIFICATION: ("Message", "MessageId", "Subject", "Timestamp", "TopicArn", "Type"),
    SUBSCRIPTION_CONFIRMATION: _HANDSHAKE_FIELDS,
    UNSUBSCRIBE_CONFIRMATION: _HANDSHAKE_FIELDS,
}

USER_AGENT = "Amazon Simple Notification Service Agent"


class SubscriptionCallbacks(Protocol):
    """What the HTTPS endpoint asks the dispatcher when a SubscribeURL or UnsubscribeURL is fetched."""

    async def confirm(self, topic_arn: str, token: str) -> str | None:
        """Marks the subscription with this token confirmed; its SubscriptionArn, None if unknown."""

    async def unsubscribe(self, subscription_arn: str) -> bool:
        """Ends the subscription; False if there is none by that ARN."""


def topic_arn(region: str, account_id: str, topic_name: str) -> str:
    """A destination's stable TopicArn, shaped as SNS's (six colon-separated parts) so consumers that
    pin or parse it work: arn:postmesh:sns:<region>:<account>:<topic>."""
    if not _TOPIC_NAME.match(topic_name):
        raise InvalidArgument(
            "Topic names may contain only letters, digits, hyphens and underscores (1-256).",
            field="topic_name",
        )
    for value, name in ((region, "region"), (account_id, "account_id")):
        if not _ARN_PART.match(value):
            raise InvalidArgument(f"Invalid {name} for a topic ARN: {value!r}.", field=name)
    return f"arn:postmesh:sns:{region}:{account_id}:{topic_name}"


def subscription_arn(topic: str, subscription_id: str) -> str:
    """SNS's SubscriptionArn: the topic's ARN and the subscription's unguessable id."""
    return f"{topic}:{subscription_id}"


def string_to_sign(message: dict[str, str]) -> bytes:
    """The bytes SNS signs for this message, in SNS's documented field order."""
    fields = _SIGNED_FIELDS.get(message.get("Type", ""))
    if fields is None:
        raise ValueError(f"not an SNS message type: {message.get('Type')!r}")
    out = []
    for name in fields:
        value = message.get(name)
        if value is None:
            if name == "Subject":
                continue  # a Notification without a subject signs without the field
            raise ValueError(f"{message['Type']} needs {name}")
        out.append(f"{name}\n{value}\n")
    return "".join(out).encode("utf-8")


def _timestamp(now: dt.datetime) -> str:
    return now.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.") + f"{now.microsecond // 1000:03d}Z"


@dataclass(frozen=True)
class SnsMessage:
    """One message ready to POST: the JSON body and the headers SNS sends with it."""

    body: dict[str, str]
    headers: dict[str, str]

    def json(self) -> bytes:
        return json.dumps(self.body, ensure_ascii=False).encode("utf-8")

    @property
    def message_id(self) -> str:
        return self.body["MessageId"]


@dataclass(frozen=True)
class SnsSigner:
    """The signing key and where its certificate is served (an https URL, as consumers insist)."""

    private_key: rsa.RSAPrivateKey
    signing_cert_url: str

    def sign(self, message: dict[str, str], version: int) -> str:
        if version not in SIGNATURE_VERSIONS:
            raise InvalidArgument("SignatureVersion must be 1 or 2.", field="signature_version")
        signature = self.private_key.sign(string_to_sign(message), padding.PKCS1v15(), _HASHES[version]())
        return base64.b64encode(signature).decode("ascii")


class SnsFormat:
    """Builds signed SNS messages. `endpoint` is the base https URL of the SNS endpoint (sns_http.py)
    as subscribers reach it: SubscribeURL and UnsubscribeURL point there, as SNS's point at SNS."""

    def __init__(
        self, *, signer: SnsSigner, endpoint: str, clock: Callable[[], dt.datetime] | None = None
    ) -> None:
        if not endpoint.startswith("https://"):
            raise ValueError("the SNS endpoint must be an https URL (consumers refuse others)")
        self.signer = signer
        self.endpoint = endpoint.rstrip("/")
        self._now = clock or (lambda: dt.datetime.now(dt.UTC))

    def subscribe_url(self, topic: str, token: str) -> str:
        return f"{self.endpoint}/?" + urlencode(
            {"Action": "ConfirmSubscription", "TopicArn": topic, "Token": token}
        )

    def unsubscribe_url(self, subscription: str) -> str:
        return f"{self.endpoint}/?" + urlencode({"Action": "Unsubscribe", "SubscriptionArn": subscription})

    def _finish(self, body: dict[str, str], version: int, *, subscription: str | None = None) -> SnsMessage:
        body["SignatureVersion"] = str(version)
        body["Signature"] = self.signer.sign(body, version)
        body["SigningCertURL"] = self.signer.signing_cert_url
        if subscription is not None:
            body["UnsubscribeURL"] = self.unsubscribe_url(subscription)
        headers = {
            "x-amz-sns-message-type": body["Type"],
            "x-amz-sns-message-id": body["MessageId"],
            "x-amz-sns-topic-arn": body["TopicArn"],
            "Content-Type": "text/plain; charset=UTF-8",
            "User-Agent": USER_AGENT,
        }
        if subscription is not None:
            headers["x-amz-sns-subscription-arn"] = subscription
        return SnsMessage(body, headers)

    def notification(
        self,
        *,
        topic: str,
        subscription: str,
        message: str,
        subject: str | None = None,
        signature_version: int = 1,
        message_id: str | None = None,
    ) -> SnsMessage:
        """A Notification carrying `message` (the event JSON, as a string). Pass the same
        `message_id` when re-sending, as SNS does on retries."""
        body: dict[str, str] = {
            "Type": NOTIFICATION,
            "MessageId": message_id or str(uuid.uuid4()),
            "TopicArn": topic,
        }
        if subject:  # SNS leaves the field out when there is no subject
            body["Subject"] = subject
        body["Message"] = message
        body["Timestamp"] = _timestamp(self._now())
        return self._finish(body, signature_version, subscription=subscription)

    def _handshake(self, kind: str, topic: str, token: str, text: str, version: int) -> SnsMessage:
        body = {
            "Type": kind,
            "MessageId": str(uuid.uuid4()),
            "Token": token,
            "TopicArn": topic,
            "Message": text,
            "SubscribeURL": self.subscribe_url(topic, token),
            "Timestamp": _timestamp(self._now()),
        }
        return self._finish(body, version)

    def subscription_confirmation(self, *, topic: str, token: str, signature_version: int = 1) -> SnsMessage:
        """The first message to a new subscriber: nothing else goes to it until SubscribeURL is fetched
        (or the subscription is confirmed for it)."""
        text = (
            f"You have chosen to subscribe to the topic {topic}.\n"
            "To confirm the subscription, visit the SubscribeURL included in this message."
        )
        return self._handshake(SUBSCRIPTION_CONFIRMATION, topic, token, text, signature_version)

    def unsubscribe_confirmation(self, *, topic: str, token: str, signature_version: int = 1) -> SnsMessage:
        """Sent once a subscription has ended; SubscribeURL re-subscribes."""
        text = (
            f"You have chosen to deactivate subscription to the topic {topic}.\n"
            "To cancel this operation and restore the subscription, visit the SubscribeURL included in "
            "this message."
        )
        return self._handshake(UNSUBSCRIBE_CONFIRMATION, topic, token, text, signature_version)
