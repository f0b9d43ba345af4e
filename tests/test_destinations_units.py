"""The pieces of event destinations without a mesh: SES's JSON against AWS's own example records,
the webhook signature, the retry schedule, and which webhook URLs are refused (property-based)."""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from postmesh.common.errors import InvalidArgument, NotFound
from postmesh.events.v1 import events_pb2 as ev
from services.feedback.destinations import sesjson
from services.feedback.destinations.signing import SecretBox, new_secret, signature_header, verify
from services.feedback.destinations.targets import check_subject, check_webhook_url
from services.feedback.destinations.webhooks import retry_delay

EXAMPLES = Path(__file__).parent / "data" / "ses-event-examples"
AUTO_TAGS = {
    "ses:configuration-set",
    "ses:from-domain",
    "ses:caller-identity",
    "ses:source-ip",
    "ses:outgoing-ip",
}


def _time(text: str) -> dt.datetime:
    return dt.datetime.strptime(text, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=dt.UTC)


def _ts(text: str) -> Any:
    from google.protobuf.timestamp_pb2 import Timestamp

    stamp = Timestamp()
    stamp.FromDatetime(_time(text))
    return stamp


def _mail(record: dict[str, Any]) -> ev.Mail:
    mail = record["mail"]
    tags = mail.get("tags", {})
    message = ev.Mail(
        timestamp=_ts(mail["timestamp"]),
        message_id=mail["messageId"],
        source=mail["source"],
        sending_account_id=mail["sendingAccountId"],
        destination=mail["destination"],
        headers=[ev.Header(name=h["name"], value=h["value"]) for h in mail.get("headers", [])],
        tags=[
            ev.EmailTag(name=k, value=v) for k, values in tags.items() if k not in AUTO_TAGS for v in values
        ],
        configuration_set_name=tags.get("ses:configuration-set", [""])[0],
        subject=mail.get("commonHeaders", {}).get("subject", ""),
        source_identity=mail["sourceArn"].rpartition("/")[2],
    )
    return message


def _event(record: dict[str, Any]) -> ev.Event:
    kind = {v: k for k, v in sesjson.EVENT_TYPE_NAMES.items()}[
        record.get("eventType") or record["notificationType"]
    ]
    email = ev.EmailEvent(event_type=kind, mail=_mail(record))  # type: ignore[arg-type]
    if "bounce" in record:
        b = record["bounce"]
        email.bounce.CopyFrom(
            ev.Bounce(
                bounce_type=ev.BounceType.Value("BOUNCE_TYPE_" + b["bounceType"].upper()),
                bounce_sub_type=ev.BOUNCE_SUB_TYPE_GENERAL,
                bounced_recipients=[
                    ev.BouncedRecipient(
                        email_address=r["emailAddress"],
                        action=r.get("action", ""),
                        status=r.get("status", ""),
                        diagnostic_code=r.get("diagnosticCode", ""),
                    )
                    for r in b["bouncedRecipients"]
                ],
                timestamp=_ts(b["timestamp"]),
                feedback_id=b["feedbackId"],
                reporting_mta=b.get("reportingMTA", ""),
                remote_mta_ip=b.get("remoteMtaIp", ""),
            )
        )
    if "complaint" in record:
        c = record["complaint"]
        email.complaint.CopyFrom(
            ev.Complaint(
                complained_recipients=[
                    ev.ComplainedRecipient(email_address=r["emailAddress"]) for r in c["complainedRecipients"]
                ],
                timestamp=_ts(c["timestamp"]),
                feedback_id=c["feedbackId"],
                complaint_feedback_type=c.get("complaintFeedbackType", ""),
                user_agent=c.get("userAgent", ""),
            )
        )
        if "arrivalDate" in c:
            email.complaint.arrival_date.CopyFrom(_ts(c["arrivalDate"]))
    if "delivery" in record:
        d = record["delivery"]
        email.delivery.CopyFrom(
            ev.Delivery(
                timestamp=_ts(d["timestamp"]),
                processing_time_millis=d["processingTimeMillis"],
                recipients=d["recipients"],
                smtp_response=d["smtpResponse"],
                reporting_mta=d["reportingMTA"],
                remote_mta_ip=d.get("remoteMtaIp", ""),
            )
        )
    if "deliveryDelay" in record:
        d = record["deliveryDelay"]
        email.delivery_delay.CopyFrom(
            ev.DeliveryDelay(
                timestamp=_ts(d["timestamp"]),
                delay_type=d["delayType"],
                expiration_time=_ts(d["expirationTime"]),
                delayed_recipients=[
                    ev.DelayedRecipient(
                        email_address=r["emailAddress"],
                        status=r["status"],
                        diagnostic_code=r["diagnosticCode"],
                    )
                    for r in d["delayedRecipients"]
                ],
            )
        )
    if "reject" in record:
        email.reject.CopyFrom(ev.Reject(reason=record["reject"]["reason"]))
    if "failure" in record:
        f = record["failure"]
        email.rendering_failure.CopyFrom(
            ev.RenderingFailure(template_name=f["templateName"], error_message=f["errorMessage"])
        )
    return ev.Event(event_id="e1", account_id=record["mail"]["sendingAccountId"], email=email)


@pytest.mark.parametrize(
    "name", ["bounce", "complaint", "delivery", "send", "reject", "delivery-delay", "rendering-failure"]
)
def test_event_json_matches_aws_example_records(name: str) -> None:
    expected = json.loads((EXAMPLES / f"event-{name}.json").read_text())
    ours = json.loads(sesjson.event_json(_event(expected)))
    # What only AWS can say: its ARN, the caller's IP and IAM name. Everything else must match exactly.
    for record in (expected, ours):
        record["mail"].pop("sourceArn")
        for tag in ("ses:source-ip", "ses:outgoing-ip", "ses:caller-identity", "ses:from-domain"):
            record["mail"].get("tags", {}).pop(tag, None)
    assert ours == expected


@pytest.mark.parametrize(
    "name",
    [
        "bounce-dsn",
        "bounce-no-dsn",
        "complaint-feedback-report",
        "complaint-no-feedback-report",
        "delivery",
    ],
)
def test_identity_notifications_match_aws_example_records(name: str) -> None:
    expected = json.loads((EXAMPLES / f"notification-{name}.json").read_text())
    ours = sesjson.notification_record(_event(expected))
    assert ours is not None
    ours = json.loads(json.dumps(ours))
    # What only AWS can say: its ARN, the caller's IP and IAM name.
    for record in (expected, ours):
        for key in ("sourceArn", "sourceIp", "callerIdentity"):
            record["mail"].pop(key, None)
    assert ours == expected


def test_event_json_without_headers_still_has_common_headers_and_tags() -> None:
    mail = ev.Mail(
        message_id="m1",
        source="News <news@Example.test>",
        sending_account_id="acct",
        destination=["a@example.test"],
        subject="Hi",
        configuration_set_name="marketing",
        tags=[ev.EmailTag(name="campaign", value="x"), ev.EmailTag(name="campaign", value="y")],
    )
    mail.timestamp.FromDatetime(dt.datetime(2026, 1, 2, 3, 4, 5, 678901, tzinfo=dt.UTC))
    record = sesjson.event_record(
        ev.Event(email=ev.EmailEvent(event_type=ev.EMAIL_EVENT_TYPE_SEND, mail=mail))
    )
    assert record["eventType"] == "Send" and record["send"] == {}
    assert record["mail"]["timestamp"] == "2026-01-02T03:04:05.678Z"
    assert record["mail"]["headersTruncated"] is False and "headers" not in record["mail"]
    assert record["mail"]["commonHeaders"] == {
        "from": ["News <news@Example.test>"],
        "to": ["a@example.test"],
        "messageId": "m1",
        "subject": "Hi",
    }
    assert record["mail"]["tags"] == {
        "ses:configuration-set": ["marketing"],
        "ses:from-domain": ["example.test"],
        "ses:caller-identity": ["acct"],
        "campaign": ["x", "y"],
    }
    notification = sesjson.notification_record(
        ev.Event(email=ev.EmailEvent(event_type=ev.EMAIL_EVENT_TYPE_DELIVERY, mail=mail)),
        include_headers=False,
    )
    assert notification is not None and notification["notificationType"] == "Delivery"
    assert "commonHeaders" not in notification["mail"] and "tags" not in notification["mail"]


def test_signature_verifies_and_refuses_tampering_and_old_timestamps(tmp_path: Path) -> None:
    secret = new_secret()
    body = b'{"eventType":"Send"}'
    header = signature_header(secret, 1_700_000_000, body)
    assert header.startswith("t=1700000000,v1=")
    assert verify(secret, header, body, now=1_700_000_010)
    assert not verify(secret, header, body + b" ", now=1_700_000_010)
    assert not verify(new_secret(), header, body, now=1_700_000_010)
    assert not verify(secret, header, body, now=1_700_001_000)
    assert not verify(secret, "garbage", body, now=1_700_000_000)

    box = SecretBox.from_setting("", tmp_path)
    sealed = box.seal("acct", secret)
    assert secret.encode() not in sealed
    assert SecretBox.from_setting("", tmp_path).open("acct", sealed) == secret  # the kept key file
    with pytest.raises(ValueError):
        box.open("another-account", sealed)


def test_retry_delays_double_up_to_the_cap_and_cover_a_day() -> None:
    delays = [retry_delay(n, base=5, cap=3600) for n in range(1, 40)]
    assert delays[:4] == [5, 10, 20, 40]
    assert max(delays) == 3600 and delays == sorted(delays)
    assert sum(delays) > 24 * 3600  # attempts keep coming for the whole retry period


_FORBIDDEN_NETWORKS = [
    ipaddress.ip_network(n)
    for n in ("169.254.0.0/16", "fe80::/10", "0.0.0.0/8", "224.0.0.0/4", "240.0.0.0/4", "ff00::/8")
]
_PRIVATE_NETWORKS = [
    ipaddress.ip_network(n)
    for n in ("127.0.0.0/8", "10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "::1/128", "fc00::/7")
]


def _url(address: ipaddress.IPv4Address | ipaddress.IPv6Address, port: int) -> str:
    host = f"[{address}]" if address.version == 6 else str(address)
    return f"http://{host}:{port}/hook"


@settings(max_examples=300, deadline=None)
@given(st.ip_addresses(), st.integers(min_value=1, max_value=65535), st.booleans())
def test_webhook_addresses_are_refused_by_class(
    address: ipaddress.IPv4Address | ipaddress.IPv6Address, port: int, allow_private: bool
) -> None:
    url = _url(address, port)
    forbidden = any(address in n for n in _FORBIDDEN_NETWORKS if n.version == address.version)
    private = any(address in n for n in _PRIVATE_NETWORKS if n.version == address.version)
    try:
        check_webhook_url(url, allow_private=allow_private, own_endpoints=["127.0.0.1:50051"])
        accepted = True
    except InvalidArgument as exc:
        assert exc.field == "event_destination.webhook.url"
        accepted = False
    if forbidden or (private and not allow_private):
        assert not accepted, url
    if address == ipaddress.ip_address("127.0.0.1") and port == 50051:
        assert not accepted  # postmesh itself


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=300))
def test_any_text_as_a_webhook_url_is_accepted_or_refused_cleanly(text: str) -> None:
    try:
        url = check_webhook_url(text, allow_private=False)
    except InvalidArgument:
        return
    assert url.startswith(("http://", "https://")) and "@" not in url.split("/")[2]


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=100))
def test_nats_subjects_never_reach_wildcards_or_empty_tokens(text: str) -> None:
    try:
        subject = check_subject(text)
    except InvalidArgument:
        return
    assert "*" not in subject and ">" not in subject and "" not in subject.split(".")


async def test_a_slow_endpoint_never_delays_another_destination(tmp_path: Path, database_url: str) -> None:
    """Two webhooks: one endpoint holds every request open, the other answers at once. The second gets
    all its events while the first still holds its first one."""
    import asyncio
    import threading

    from postmesh.common import db
    from postmesh.common.bus import new_event
    from services.feedback.configsets import CONFIRMED
    from services.feedback.destinations.webhooks import WebhookDispatcher, WebhookOutbox
    from services.feedback.models import Base, ConfigurationSet, EventDestination
    from tests.delivery_helpers import wait_until
    from tests.destinations_helpers import WebhookReceiver

    engine = db.create_engine(database_url)
    async with engine.begin() as connection:
        await connection.run_sync(Base.metadata.create_all)
    sessions = db.session_factory(engine)

    class Clock:
        def now(self) -> dt.datetime:
            return dt.datetime.now(dt.UTC)

    slow, fast = WebhookReceiver().start(), WebhookReceiver().start()
    slow.gate = threading.Event()
    box = SecretBox.from_setting("", tmp_path)
    destinations = []
    async with db.transaction(sessions) as session:
        owner = ConfigurationSet(account_id="acct", name="s", created_at=Clock().now())
        session.add(owner)
        await session.flush()
        for name, receiver in (("slow", slow), ("fast", fast)):
            row = EventDestination(
                configuration_set_id=owner.id,
                account_id="acct",
                name=name,
                enabled=True,
                event_types="SEND",
                kind="webhook",
                target=receiver.url,
                format="JSON",
                subscription_status=CONFIRMED,
                sealed_secret=box.seal("acct", new_secret()),
                created_at=Clock().now(),
            )
            session.add(row)
            destinations.append(row)
    outbox = WebhookOutbox(
        sessions, Clock(), retry_period=dt.timedelta(hours=24), backoff=0.2, backoff_max=1.0
    )
    for i in range(3):
        event = new_event(
            "acct",
            email=ev.EmailEvent(
                event_type=ev.EMAIL_EVENT_TYPE_SEND,
                mail=ev.Mail(message_id=f"m{i}", source="a@example.test", sending_account_id="acct"),
            ),
        )
        for destination in destinations:
            await outbox.enqueue(destination, event)
    dispatcher = WebhookDispatcher(outbox, box, timeout=120, poll_seconds=0.1, allow_private=True)
    running = asyncio.create_task(dispatcher.run())
    try:
        await wait_until(lambda: len(fast.deliveries) >= 3, what="the fast endpoint's deliveries")
        assert len(fast.deliveries) == 3
        assert slow.waiting == 1 and slow.deliveries == []  # still holding its first request
        slow.gate.set()
        await wait_until(lambda: len(slow.deliveries) >= 3, what="the slow endpoint's deliveries")
        assert [json.loads(d.body)["mail"]["messageId"] for d in slow.deliveries] == ["m0", "m1", "m2"]
    finally:
        slow.gate.set()
        running.cancel()
        with pytest.raises(asyncio.CancelledError):
            await running
        slow.stop()
        fast.stop()
        await engine.dispose()


async def test_failing_deliveries_back_off_then_die_and_replay(database_url: str) -> None:
    """The outbox on each database: a failure schedules the next attempt by the backoff; past the
    retry period the row is a dead letter (listed, per account); a replay makes it due again."""
    from postmesh.common import db
    from postmesh.common.bus import new_event
    from services.feedback.configsets import CONFIRMED
    from services.feedback.destinations.webhooks import WebhookOutbox
    from services.feedback.models import Base, ConfigurationSet, EventDestination

    engine = db.create_engine(database_url)
    async with engine.begin() as connection:
        await connection.run_sync(Base.metadata.create_all)
    sessions = db.session_factory(engine)
    start = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)

    class Clock:
        now_value = start

        def now(self) -> dt.datetime:
            return self.now_value

    clock = Clock()
    async with db.transaction(sessions) as session:
        owner = ConfigurationSet(account_id="acct", name="s", created_at=start)
        session.add(owner)
        await session.flush()
        destination = EventDestination(
            configuration_set_id=owner.id,
            account_id="acct",
            name="hook",
            enabled=True,
            event_types="SEND",
            kind="webhook",
            target="http://127.0.0.1:9/",
            format="JSON",
            subscription_status=CONFIRMED,
            sealed_secret=b"x",
            created_at=start,
        )
        session.add(destination)
    outbox = WebhookOutbox(sessions, clock, retry_period=dt.timedelta(hours=24), backoff=5, backoff_max=3600)
    event = new_event(
        "acct", email=ev.EmailEvent(event_type=ev.EMAIL_EVENT_TYPE_SEND, mail=ev.Mail(message_id="m"))
    )
    await outbox.enqueue(destination, event)
    await outbox.enqueue(destination, event)  # the same event again (redelivered): still one row
    assert await outbox.due_destinations(10) == [destination.id]
    _, rows = await outbox.due(destination.id)
    assert len(rows) == 1
    await outbox.failed(rows[0], "HTTP 503")
    assert await outbox.due_destinations(10) == []  # not before the backoff
    clock.now_value = start + dt.timedelta(seconds=5)
    _, rows = await outbox.due(destination.id)
    assert rows[0].attempts == 1 and rows[0].last_error == "HTTP 503"
    clock.now_value = start + dt.timedelta(hours=25)
    await outbox.failed(rows[0], "timeout")
    assert await outbox.due_destinations(10) == []
    letters, token = await outbox.dead_letters("acct", 0, "")
    assert token == "" and [(d.event_id, d.attempts, e.name, c.name) for d, e, c in letters] == [
        (event.event_id, 2, "hook", "s")
    ]
    assert (await outbox.dead_letters("another", 0, ""))[0] == []
    with pytest.raises(InvalidArgument):
        await outbox.replay([], every=False, account_id="")
    assert await outbox.replay([], every=True, account_id="another") == 0
    assert await outbox.replay([letters[0][0].id], every=False, account_id="") == 1
    assert await outbox.due_destinations(10) == [destination.id]
    _, rows = await outbox.due(destination.id)
    await outbox.delivered(rows[0], after_failures=True)
    assert await outbox.due_destinations(10) == [] and (await outbox.dead_letters("", 0, ""))[0] == []
    await engine.dispose()


def test_postmesh_own_ports_are_refused_on_its_own_addresses_only() -> None:
    own = ["127.0.0.1:50051", "0.0.0.0:9464"]
    for url in (
        "http://127.0.0.1:50051/",
        "http://10.0.0.5:9464/",
        "http://localhost:9464/",
        "http://[::1]:9464/",
    ):
        with pytest.raises(InvalidArgument):
            check_webhook_url(url, allow_private=True, own_endpoints=own)
    for url in ("http://93.184.216.34:9464/", "https://hooks.example.com:50051/x", "http://127.0.0.1:8080/"):
        assert check_webhook_url(url, allow_private=True, own_endpoints=own) == url


async def test_webhooks_go_to_the_address_that_was_checked(tmp_path: Path) -> None:
    """A host name is resolved and checked at each attempt, and the request goes to that address with
    the name in Host: a name that now resolves to a metadata address is refused."""
    from services.feedback.destinations.webhooks import WebhookDispatcher, WebhookOutbox
    from tests.destinations_helpers import WebhookReceiver

    answers = {"hooks.test": ["127.0.0.1"], "evil.test": ["169.254.169.254"]}

    async def resolve(host: str, port: int) -> list[str]:
        return answers[host]

    receiver = WebhookReceiver().start()
    dispatcher = WebhookDispatcher(
        WebhookOutbox(None, None, retry_period=dt.timedelta(hours=1), backoff=1, backoff_max=1),  # type: ignore[arg-type]
        SecretBox.from_setting("", tmp_path),
        timeout=30,
        poll_seconds=1,
        allow_private=True,
        resolve=resolve,
    )
    url, host, server_name = await dispatcher._pinned(f"http://hooks.test:{receiver.port}/hook?a=1")
    assert url == f"http://127.0.0.1:{receiver.port}/hook?a=1"
    assert host == {"Host": f"hooks.test:{receiver.port}"} and server_name == {}
    import httpx

    async with httpx.AsyncClient() as client:  # what the dispatcher does with them
        answer = await client.post(url, content=b"{}", headers=host, extensions=server_name)
    assert answer.status_code == 200
    assert receiver.deliveries[0].headers["Host"] == f"hooks.test:{receiver.port}"
    url, host, server_name = await dispatcher._pinned("https://hooks.test/x")
    assert url == "https://127.0.0.1/x" and server_name == {"sni_hostname": "hooks.test"}
    with pytest.raises(InvalidArgument):
        await dispatcher._pinned("http://evil.test/hook")
    strict = WebhookDispatcher(
        WebhookOutbox(None, None, retry_period=dt.timedelta(hours=1), backoff=1, backoff_max=1),  # type: ignore[arg-type]
        SecretBox.from_setting("", tmp_path),
        timeout=30,
        poll_seconds=1,
        allow_private=False,
        resolve=resolve,
    )
    for url in ("http://hooks.test/hook", "http://127.0.0.1:9/hook"):
        with pytest.raises(InvalidArgument):
            await strict._pinned(url)
    receiver.stop()


async def test_a_subscription_reopened_with_other_event_types_follows_the_new_ones(nats_url: str) -> None:
    import nats as nats_client

    from postmesh.common.bus import ensure_streams
    from postmesh.common.streams import ACCOUNT_EVENTS
    from services.feedback.destinations.subscribers import SubscribedAccounts
    from services.feedback.destinations.subscriptions import Opening, Subscriptions, consumer_name

    connection = await nats_client.connect(nats_url)
    try:
        js = connection.jetstream()
        await ensure_streams(js, [ACCOUNT_EVENTS])
        subscriptions = Subscriptions(js, subscribers=SubscribedAccounts(js), max_unacked=10, ack_wait=30)
        first = await subscriptions.open("acct-reopen", Opening("s", [ev.EMAIL_EVENT_TYPE_BOUNCE]))
        await first.unsubscribe()
        again = await subscriptions.open(
            "acct-reopen", Opening("s", [ev.EMAIL_EVENT_TYPE_DELIVERY, ev.EMAIL_EVENT_TYPE_COMPLAINT])
        )
        info = await js.consumer_info(ACCOUNT_EVENTS.name, consumer_name("acct-reopen", "s"))
        assert sorted(info.config.filter_subjects or []) == [
            "postmesh.account-events.acct-reopen.complaint",
            "postmesh.account-events.acct-reopen.delivery",
        ]
        await again.unsubscribe()
        await subscriptions.delete("acct-reopen", "s")
        with pytest.raises(NotFound):
            await subscriptions.delete("acct-reopen", "s")
    finally:
        await connection.close()
