"""The CLI for configuration sets, destinations, webhook tests, the event stream and dead letters;
and the NATS subject destination. One mesh without delivery workers: Send events are enough here."""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import Iterator
from pathlib import Path

import nats
import pytest

from postmesh.cli.main import main
from postmesh.sender.v1 import sender_pb2 as pb
from postmesh.testing import MeshThread
from postmesh.testing_mail import LoopbackDns
from services.feedback.destinations.signing import verify
from tests.conftest import MeshFactory
from tests.destinations_helpers import Follower, WebhookReceiver
from tests.identity_helpers import create_verified_domain
from tests.sending_helpers import own_nats_server


@pytest.fixture
def zone() -> Iterator[LoopbackDns]:
    with LoopbackDns() as server:
        yield server


@pytest.fixture
def nats_url(tmp_path: Path) -> Iterator[str]:
    with own_nats_server(tmp_path / "nats") as url:
        yield url


@pytest.fixture
def accept_mesh(start_mesh: MeshFactory, zone: LoopbackDns, nats_url: str) -> MeshThread:
    return start_mesh(
        sandbox_max_send_rate=1000.0,
        dns_resolver=zone.address,
        dns_check_poll_seconds=3600,
        dns_timeout_seconds=2,
        delivery_workers=0,
        webhook_allow_private_targets=True,
        webhook_backoff_seconds=0.2,
        webhook_backoff_max_seconds=0.5,
        webhook_poll_seconds=0.2,
        webhook_retry_hours=0.0005,  # under two seconds: then a dead letter
        event_subscription_max_unacked=3,
    )


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _send(mesh: MeshThread, key: str, configuration_set: str) -> str:
    with mesh.client(key) as client:
        return client.sender.SendEmail(
            pb.SendEmailRequest(
                from_email_address="news@example.test",
                destination=pb.Destination(to_addresses=["r@example.test"]),
                configuration_set_name=configuration_set,
                content=pb.EmailContent(
                    simple=pb.Message(subject=pb.Content(data="Hi"), body=pb.Body(text=pb.Content(data="x")))
                ),
            )
        ).message_id


def test_config_sets_destinations_follow_and_dead_letters_through_the_cli(
    accept_mesh: MeshThread,
    zone: LoopbackDns,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    account_id, key = accept_mesh.create_account()
    with accept_mesh.client(key) as client:
        create_verified_domain(client, zone, "example.test")
    monkeypatch.setenv("POSTMESH_ENDPOINT", accept_mesh.address)
    monkeypatch.setenv("POSTMESH_API_KEY", key)
    monkeypatch.setenv("POSTMESH_ADMIN_KEY", accept_mesh.admin_key)

    assert _run(capsys, "config-set", "create", "app", "--suppressed-reasons", "COMPLAINT")[0] == 0
    code, out, _ = _run(capsys, "config-set", "list")
    assert code == 0 and out.split() == ["app"]
    code, _, err = _run(capsys, "config-set", "create", "app")
    assert code == 1 and "ALREADY_EXISTS" in err

    failing = WebhookReceiver().start()
    failing.status = 500
    code, out, _ = _run(
        capsys,
        "config-set",
        "destination",
        "add",
        "app",
        "hook",
        "--webhook",
        failing.url,
        "--events",
        "send",
    )
    secret = re.search(r"signing secret: (whsec_\S+)", out)
    assert code == 0 and secret, out
    code, out, _ = _run(
        capsys,
        "config-set",
        "destination",
        "add",
        "app",
        "bus",
        "--nats-subject",
        "app.ses",
        "--events",
        "send,bounce",
    )
    assert code == 0 and "signing secret" not in out
    code, out, _ = _run(capsys, "config-set", "show", "app")
    assert code == 0 and "suppression:       COMPLAINT" in out and failing.url in out
    code, out, _ = _run(capsys, "config-set", "update", "app", "--pause", "--max-delivery-seconds", "900")
    assert code == 0 and "sending paused" in out
    code, out, _ = _run(capsys, "config-set", "update", "app", "--tls-policy", "require")
    code, out, _ = _run(capsys, "config-set", "show", "app")
    assert "sending:           PAUSED" in out and "tls policy:        REQUIRE" in out
    assert "max delivery:      900 s" in out
    code, _, err = _run(capsys, "config-set", "update", "app", "--max-delivery-seconds", "60")
    assert code == 1 and "max_delivery_seconds" in err
    code, out, _ = _run(
        capsys,
        "config-set",
        "update",
        "app",
        "--resume",
        "--tls-policy",
        "optional",
        "--suppressed-reasons",
        "account",
    )
    assert code == 0
    code, out, _ = _run(capsys, "config-set", "show", "app")
    assert "sending:           enabled" in out and "suppression:       account-level" in out
    assert f"postmesh-user.{account_id}.app.ses" in out
    code, _, err = _run(
        capsys,
        "config-set",
        "destination",
        "add",
        "app",
        "x",
        "--webhook",
        "http://169.254.169.254/",
        "--events",
        "send",
    )
    assert code == 1 and "INVALID_ARGUMENT" in err

    # A NATS subject destination: the SES JSON on the user's subject, under postmesh's prefix.
    async def on_subject() -> tuple[dict[str, object], str]:
        connection = await nats.connect(accept_mesh.settings.nats_url)
        try:
            subscription = await connection.subscribe(f"postmesh-user.{account_id}.app.ses")
            await connection.flush()
            message_id = await asyncio.to_thread(_send, accept_mesh, key, "app")
            message = await subscription.next_msg(timeout=60)
            return json.loads(message.data), message_id
        finally:
            await connection.close()

    record, message_id = asyncio.run(on_subject())
    assert record["eventType"] == "Send" and record["mail"]["messageId"] == message_id  # type: ignore[index]

    # The webhook keeps answering 500: past the retry period the delivery is a dead letter.
    deadline = time.monotonic() + 60
    out = ""
    while time.monotonic() < deadline:
        code, out, _ = _run(capsys, "admin", "dead-letters", "list", "--json")
        if json.loads(out).get("dead_letters"):
            break
        time.sleep(0.5)
    letters = json.loads(out)["dead_letters"]
    assert len(letters) == 1 and letters[0]["account_id"] == account_id
    assert letters[0]["last_error"] == "HTTP 500" and letters[0]["event_destination_name"] == "hook"
    monkeypatch.setenv("POSTMESH_ADMIN_KEY", key)
    assert _run(capsys, "admin", "dead-letters", "list")[0] == 1
    monkeypatch.setenv("POSTMESH_ADMIN_KEY", accept_mesh.admin_key)

    failing.status = 200
    code, out, _ = _run(capsys, "admin", "dead-letters", "replay", "--all")
    assert code == 0 and "replayed: 1" in out
    replayed = failing.wait_for(lambda d: len(d) == 1)[0]
    assert verify(
        secret.group(1), replayed.headers["X-Postmesh-Signature"], replayed.body, now=int(time.time())
    )
    assert json.loads(replayed.body)["mail"]["messageId"] == message_id
    failing.stop()

    # `events follow` resumes a durable subscription: made first, then the CLI reads what came since.
    with accept_mesh.client(key) as client:
        Follower(client, "cli").close()
    sent = _send(accept_mesh, key, "app")
    code, out, _ = _run(capsys, "events", "follow", "--name", "cli", "--count", "1", "--json")
    assert code == 0 and json.loads(out)["mail"]["messageId"] == sent

    # `webhook test`: a signed sample event, and the answer shown.
    receiver = WebhookReceiver().start()
    code, out, _ = _run(capsys, "webhook", "test", receiver.url, "--secret", secret.group(1))
    assert code == 0 and "response: HTTP 200" in out
    sample = receiver.wait_for(lambda d: len(d) == 1)[0]
    assert verify(secret.group(1), sample.headers["X-Postmesh-Signature"], sample.body, now=int(time.time()))
    assert json.loads(sample.body)["eventType"] == "Bounce"
    receiver.stop()

    assert _run(capsys, "config-set", "destination", "remove", "app", "hook")[0] == 0
    code, out, _ = _run(capsys, "config-set", "destination", "list", "app")
    assert code == 0 and "hook" not in out and "bus" in out
    assert _run(capsys, "config-set", "delete", "app")[0] == 0


def test_a_subscriber_that_never_acknowledges_holds_a_bounded_number_of_events(
    accept_mesh: MeshThread, zone: LoopbackDns
) -> None:
    _, key = accept_mesh.create_account()
    with accept_mesh.client(key) as client:
        create_verified_domain(client, zone, "example.test")
        follower = Follower(client, "lazy")
        sent = [_send(accept_mesh, key, "") for _ in range(5)]
        held = follower.wait_for(3)
        assert len(held) == 3
        time.sleep(2.0)  # more would have come by now; none may while three wait for acknowledgement
        assert len(follower.events()) == 3
        follower.ack(held[0].event.event_id)
        assert len(follower.wait_for(4)) == 4
        follower.close()
        # Back again: the three never acknowledged come again, then the fifth.
        again = Follower(client, "lazy")
        ids = {r.event.email.mail.message_id for r in again.wait_for(3)}
        assert ids <= set(sent[1:]) and len(ids) == 3
        again.close()


def test_sns_destinations_are_added_and_confirmed_through_the_cli(
    start_mesh: MeshFactory,
    accept_mesh: MeshThread,
    zone: LoopbackDns,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    mesh = start_mesh(
        dns_resolver=zone.address,
        dns_check_poll_seconds=3600,
        sns_https_listen="127.0.0.1:0",
        sns_cert_host="localhost",
        webhook_allow_private_targets=True,
        webhook_poll_seconds=0.2,
    )
    account_id, key = mesh.create_account()
    monkeypatch.setenv("POSTMESH_ENDPOINT", mesh.address)
    monkeypatch.setenv("POSTMESH_API_KEY", key)
    receiver = WebhookReceiver().start()
    assert _run(capsys, "config-set", "create", "app")[0] == 0
    add = ("config-set", "destination", "add", "app")
    code, out, err = _run(
        capsys, *add, "sns", "--webhook", receiver.url, "--events", "bounce", "--format", "sns"
    )
    assert code == 0 and "SubscriptionConfirmation" in out and "destination confirm app sns" in out, err
    code, _, err = _run(
        capsys,
        *add,
        "v2",
        "--webhook",
        receiver.url,
        "--events",
        "bounce",
        "--format",
        "sns",
        "--signature-version",
        "2",
    )
    assert code == 0, err
    code, _, err = _run(
        capsys, *add, "bad", "--webhook", receiver.url, "--events", "bounce", "--signature-version", "2"
    )
    assert code == 1 and "signature_version" in err  # a JSON webhook has no SignatureVersion
    assert _run(capsys, *add, "json", "--webhook", receiver.url, "--events", "bounce")[0] == 0
    code, out, _ = _run(capsys, "config-set", "destination", "list", "app")
    topic = f"arn:postmesh:sns:postmesh:{account_id}:app-sns"
    rows = {line.split()[0]: line for line in out.splitlines()[1:]}
    assert f"({topic}, SignatureVersion 1)" in rows["sns"] and "PENDING_CONFIRMATION" in rows["sns"]
    assert "SignatureVersion 2" in rows["v2"] and "CONFIRMED" in rows["json"]
    # Both handshakes arrive first, signed with the version each destination chose.
    handshakes = [json.loads(d.body) for d in receiver.wait_for(lambda d: len(d) >= 2)]
    assert {(h["Type"], h["TopicArn"], h["SignatureVersion"]) for h in handshakes} == {
        ("SubscriptionConfirmation", topic, "1"),
        ("SubscriptionConfirmation", topic.replace("app-sns", "app-v2"), "2"),
    }

    code, out, _ = _run(capsys, "config-set", "destination", "confirm", "app", "sns")
    assert code == 0 and re.fullmatch(rf"subscription confirmed: {re.escape(topic)}:[0-9a-f-]{{36}}\n", out)
    code, out, _ = _run(capsys, "config-set", "destination", "list", "app")
    assert "PENDING" not in next(line for line in out.splitlines() if line.startswith("sns "))
    code, _, err = _run(capsys, "config-set", "destination", "confirm", "app", "json")
    assert code == 1 and "NOT_SNS_FORMAT" in err
    code, _, err = _run(capsys, "config-set", "destination", "confirm", "app", "missing")
    assert code == 1 and "does not exist" in err
    receiver.stop()

    # Without SNS_HTTPS_LISTEN there is no SNS format to add or confirm.
    _, other_key = accept_mesh.create_account()
    monkeypatch.setenv("POSTMESH_ENDPOINT", accept_mesh.address)
    monkeypatch.setenv("POSTMESH_API_KEY", other_key)
    assert _run(capsys, "config-set", "create", "app")[0] == 0
    code, _, err = _run(
        capsys, *add, "sns", "--webhook", receiver.url, "--events", "bounce", "--format", "sns"
    )
    assert code == 1 and "UNSUPPORTED_FORMAT" in err
    code, _, err = _run(capsys, "config-set", "destination", "confirm", "app", "sns")
    assert code == 1 and "UNSUPPORTED_FORMAT" in err
