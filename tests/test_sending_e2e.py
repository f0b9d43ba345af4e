"""Sending with real identities: an account verifies a domain through a DNS server on loopback, then
sends. What was queued is read off the outbound work queue (delivery off), or, with delivery on, what
arrived at a real SMTP server found through MX and DKIM-verified against the published keys."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from email import message_from_bytes, policy
from email.message import EmailMessage
from pathlib import Path

import dkim
import grpc
import pytest
from grpc import aio

from postmesh.client import error_details
from postmesh.common.natsserver import free_port
from postmesh.events.v1 import events_pb2 as ev
from postmesh.feedback.v1 import configuration_sets_pb2, feedback_pb2
from postmesh.identity.v1 import identity_pb2
from postmesh.quota.v1 import quota_pb2
from postmesh.sender.v1 import sender_pb2 as pb
from postmesh.sender.v1 import sender_pb2_grpc
from postmesh.testing import MeshThread
from postmesh.testing_mail import LoopbackDns, SmtpServer
from tests.conftest import MeshFactory
from tests.dkim_verifiers import dkimpy_dns, perl_dkim_available, perl_dkim_result
from tests.identity_helpers import create_verified_domain
from tests.sending_helpers import (
    email_events,
    of_type,
    own_nats_server,
    queued_messages,
    refusal,
    sent_last_24_hours,
)

SEND = ev.EMAIL_EVENT_TYPE_SEND
BOUNCE = ev.EMAIL_EVENT_TYPE_BOUNCE
RENDERING_FAILURE = ev.EMAIL_EVENT_TYPE_RENDERING_FAILURE


@pytest.fixture
def zone() -> Iterator[LoopbackDns]:
    with LoopbackDns() as server:
        yield server


def _settings(zone: LoopbackDns, **extra: object) -> dict[str, object]:
    return {
        "sandbox_max_send_rate": 1000.0,
        "dns_resolver": zone.address,
        "dns_check_poll_seconds": 3600,
        "dns_timeout_seconds": 2,
        "message_id_domain": "mail.postmesh.test",
        **extra,
    }


@pytest.fixture
def nats_url(tmp_path: Path) -> Iterator[str]:
    """Overrides the suite's shared server for this module (and start_mesh): see own_nats_server."""
    with own_nats_server(tmp_path / "nats") as url:
        yield url


@pytest.fixture
def accept_mesh(start_mesh: MeshFactory, zone: LoopbackDns, nats_url: str) -> MeshThread:
    """The whole mesh without delivery workers: accepted messages stay on the work queue."""
    return start_mesh(**_settings(zone, delivery_workers=0))


def _simple(sender: str, to: list[str], **fields: object) -> pb.SendEmailRequest:
    request = pb.SendEmailRequest(
        from_email_address=sender,
        destination=pb.Destination(to_addresses=to),
        content=pb.EmailContent(
            simple=pb.Message(
                subject=pb.Content(data="Hello"),
                body=pb.Body(text=pb.Content(data="Plain text"), html=pb.Content(data="<p>HTML</p>")),
            )
        ),
    )
    for name, value in fields.items():
        if isinstance(value, list):
            getattr(request, name).extend(value)
        elif hasattr(value, "CopyFrom"):
            getattr(request, name).CopyFrom(value)
        else:
            setattr(request, name, value)
    return request


def _parse(data: bytes) -> EmailMessage:
    message = message_from_bytes(data, policy=policy.default)
    assert isinstance(message, EmailMessage)
    return message


def test_simple_raw_and_templated_sends_are_queued_as_final_mime(
    accept_mesh: MeshThread, zone: LoopbackDns
) -> None:
    account_id, key = accept_mesh.create_account()
    nats_url = accept_mesh.settings.nats_url
    with accept_mesh.client(key) as client:
        create_verified_domain(client, zone, "example.test")
        create_verified_domain(client, zone, "bücher.test")
        client.feedback.CreateConfigurationSet(
            configuration_sets_pb2.CreateConfigurationSetRequest(configuration_set_name="marketing")
        )
        simple = client.sender.SendEmail(
            _simple(
                "Zoë Sender <zoe@bücher.test>",
                ["to@example.test"],
                destination=pb.Destination(
                    to_addresses=["To Person <to@example.test>"],
                    cc_addresses=["cc@example.test"],
                    bcc_addresses=["hidden@example.test", "TO@example.test"],
                ),
                reply_to_addresses=["replies@example.test"],
                email_tags=[pb.MessageTag(name="campaign", value="winter-2026")],
                configuration_set_name="marketing",
                feedback_forwarding_email_address="feedback@example.test",
            )
        ).message_id
        raw = (
            b"From: Raw Sender <raw@example.test>\r\nTo: r1@example.test\r\nBcc: secret@example.test\r\n"
            b"Subject: raw one\r\nX-SES-MESSAGE-TAGS: kind=raw\r\nMessage-ID: <client@example.test>\r\n\r\n"
            b"raw body\r\n"
        )
        # Over 512 KB: the body rides in the JetStream object store, not in the queued message.
        big_body = b"".join(b"line %06d of a long message\r\n" % i for i in range(30_000))
        big = b"From: raw@example.test\r\nTo: big@example.test\r\nSubject: big\r\n\r\n" + big_body
        big_id = client.sender.SendEmail(
            pb.SendEmailRequest(content=pb.EmailContent(raw=pb.RawMessage(data=big)))
        ).message_id
        raw_id = client.sender.SendEmail(
            pb.SendEmailRequest(content=pb.EmailContent(raw=pb.RawMessage(data=raw)))
        ).message_id
        client.sender.CreateEmailTemplate(
            pb.CreateEmailTemplateRequest(
                template_name="order",
                template_content=pb.EmailTemplateContent(
                    subject='Order {{order.id}} for {{default name "you"}}',
                    text="{{#each order.items}}- {{this}}\n{{/each}}",
                    html="<ul>{{#each order.items}}<li>{{this}}</li>{{/each}}</ul>",
                ),
            )
        )
        templated = client.sender.SendEmail(
            _simple(
                "shop@example.test",
                ["buyer@example.test"],
                content=pb.EmailContent(
                    template=pb.Template(
                        template_name="order",
                        template_data=json.dumps({"order": {"id": 42, "items": ["<tea>", "cups"]}}),
                    )
                ),
            )
        ).message_id

    queued = {q.message_id: q for q in queued_messages(nats_url, account_id, wait_for=4)}
    assert set(queued) == {simple, raw_id, templated, big_id}
    assert queued[big_id].mime_object and queued[big_id].mime.endswith(big_body)

    first = queued[simple]
    # Envelope: To + Cc + Bcc, each once; the From identity and its domain; what the caller asked for.
    assert list(first.recipients) == ["to@example.test", "cc@example.test", "hidden@example.test"]
    assert (first.from_address, first.from_identity) == ("zoe@xn--bcher-kva.test", "xn--bcher-kva.test")
    assert first.identity_owner_account_id == account_id
    assert [(t.name, t.value) for t in first.tags] == [("campaign", "winter-2026")]
    assert first.configuration_set_name == "marketing"
    assert first.feedback_forwarding_address == "feedback@example.test"
    assert first.subject == "Hello" and first.accepted_time.seconds > 0
    message = _parse(first.mime)
    assert message["Message-ID"] == f"<{simple}@mail.postmesh.test>"
    assert message["From"].addresses[0].display_name == "Zoë Sender"
    assert message["From"].addresses[0].addr_spec == "zoe@xn--bcher-kva.test"
    assert "Bcc" not in message and b"hidden@example.test" not in first.mime
    assert message["Reply-To"] == "replies@example.test" and message["Cc"] == "cc@example.test"
    assert message.get_content_type() == "multipart/alternative"
    assert first.mime.count(b"\r\n") > 5 and all(b < 128 for b in first.mime)

    second = queued[raw_id]
    assert list(second.recipients) == ["r1@example.test", "secret@example.test"]
    assert [(t.name, t.value) for t in second.tags] == [("kind", "raw")]
    raw_message = _parse(second.mime)
    assert raw_message.get_all("Message-ID") == [f"<{raw_id}@mail.postmesh.test>"]
    assert "Bcc" not in raw_message and "X-SES-MESSAGE-TAGS" not in raw_message
    assert second.mime.endswith(b"\r\n\r\nraw body\r\n")

    third = _parse(queued[templated].mime)
    assert third["Subject"] == "Order 42 for you"
    text, html = third.iter_parts()
    assert text.get_content().replace("\r\n", "\n") == "- <tea>\n- cups\n"  # canonical CRLF
    assert html.get_content().strip() == "<ul><li>&lt;tea&gt;</li><li>cups</li></ul>"

    # One Send event per accepted message, naming it.
    events = email_events(nats_url, account_id, until=lambda e: len(of_type(e, SEND)) >= 4)
    sends = {e.email.mail.message_id: e.email.mail for e in of_type(events, SEND)}
    assert set(sends) == {simple, raw_id, templated, big_id}
    assert sends[simple].source_identity == "xn--bcher-kva.test"
    assert sends[simple].configuration_set_name == "marketing"


def test_refusals_leave_nothing_queued_and_no_quota_used(accept_mesh: MeshThread, zone: LoopbackDns) -> None:
    account_id, key = accept_mesh.create_account()
    nats_url = accept_mesh.settings.nats_url
    with accept_mesh.client(key) as client:
        create_verified_domain(client, zone, "example.test")
        # From an identity the account does not have.
        code, reason, message, _ = refusal(
            lambda: client.sender.SendEmail(_simple("me@unverified.test", ["a@example.test"]))
        )
        assert (code, reason) == (grpc.StatusCode.FAILED_PRECONDITION, "MESSAGE_REJECTED")
        assert "me@unverified.test" in message
        # A raw message whose From header is not verified, though the envelope sender is.
        raw = b"From: other@unverified.test\r\nTo: a@example.test\r\nSubject: x\r\n\r\nbody\r\n"
        code, reason, _, _ = refusal(
            lambda: client.sender.SendEmail(
                pb.SendEmailRequest(
                    from_email_address="me@example.test", content=pb.EmailContent(raw=pb.RawMessage(data=raw))
                )
            )
        )
        assert (code, reason) == (grpc.StatusCode.FAILED_PRECONDITION, "MESSAGE_REJECTED")
        # The feedback forwarding address must be the account's too.
        code, reason, message, _ = refusal(
            lambda: client.sender.SendEmail(
                _simple(
                    "me@example.test",
                    ["a@example.test"],
                    feedback_forwarding_email_address="bounces@unverified.test",
                )
            )
        )
        assert (code, reason) == (grpc.StatusCode.FAILED_PRECONDITION, "MESSAGE_REJECTED")
        assert "bounces@unverified.test" in message
        # The sandbox: every recipient must be verified.
        code, reason, message, _ = refusal(
            lambda: client.sender.SendEmail(
                _simple("me@example.test", ["a@example.test", "x@elsewhere.test"])
            )
        )
        assert (code, reason) == (grpc.StatusCode.FAILED_PRECONDITION, "MESSAGE_REJECTED")
        assert "x@elsewhere.test" in message and "a@example.test" not in message
        # A custom MAIL FROM domain that must be verified first.
        client.identity.PutEmailIdentityMailFromAttributes(
            identity_pb2.PutEmailIdentityMailFromAttributesRequest(
                email_identity="example.test",
                mail_from_domain="bounce.example.test",
                behavior_on_mx_failure=identity_pb2.BEHAVIOR_ON_MX_FAILURE_REJECT_MESSAGE,
            )
        )
        code, reason, _, _ = refusal(
            lambda: client.sender.SendEmail(_simple("me@example.test", ["a@example.test"]))
        )
        assert (code, reason) == (grpc.StatusCode.FAILED_PRECONDITION, "MAIL_FROM_DOMAIN_NOT_VERIFIED")
        # Bulk: the sender is checked once for the whole call.
        client.sender.CreateEmailTemplate(
            pb.CreateEmailTemplateRequest(
                template_name="t", template_content=pb.EmailTemplateContent(subject="s", text="t")
            )
        )
        code, reason, _, _ = refusal(
            lambda: client.sender.SendBulkEmail(
                pb.SendBulkEmailRequest(
                    from_email_address="me@unverified.test",
                    default_content=pb.BulkEmailContent(template=pb.Template(template_name="t")),
                    bulk_email_entries=[
                        pb.BulkEmailEntry(destination=pb.Destination(to_addresses=["a@example.test"]))
                    ],
                )
            )
        )
        assert (code, reason) == (grpc.StatusCode.FAILED_PRECONDITION, "MESSAGE_REJECTED")
        # Every reservation was given back.
        assert sent_last_24_hours(client, 0) == 0
    assert queued_messages(nats_url, account_id, timeout=1.0) == []
    assert of_type(email_events(nats_url, account_id), SEND) == []


def test_sending_authorization_lets_another_account_send_as_an_identity(
    accept_mesh: MeshThread, zone: LoopbackDns
) -> None:
    owner_id, owner_key = accept_mesh.create_account("owner")
    user_id, user_key = accept_mesh.create_account("user")
    arn = f"arn:aws:ses:local:{owner_id}:identity/brand.test"
    with accept_mesh.client(owner_key) as owner, accept_mesh.client(user_key) as user:
        create_verified_domain(owner, zone, "brand.test")
        create_verified_domain(user, zone, "user.test")  # the user's sandbox recipients
        request = _simple("news@brand.test", ["a@user.test"], from_email_address_identity_arn=arn)
        code, reason, _, _ = refusal(lambda: user.sender.SendEmail(request))
        assert (code, reason) == (grpc.StatusCode.FAILED_PRECONDITION, "MESSAGE_REJECTED")
        policy_text = json.dumps(
            {"Statement": [{"Effect": "Allow", "Principal": {"AWS": user_id}, "Action": ["ses:SendEmail"]}]}
        )
        owner.identity.PutEmailIdentityPolicy(
            identity_pb2.PutEmailIdentityPolicyRequest(
                email_identity="brand.test", policy_name="user", policy=policy_text
            )
        )
        message_id = user.sender.SendEmail(request).message_id
    (queued,) = queued_messages(accept_mesh.settings.nats_url, user_id, wait_for=1)
    assert (queued.message_id, queued.from_identity, queued.identity_owner_account_id) == (
        message_id,
        "brand.test",
        owner_id,
    )


def test_suppressed_recipients_bounce_and_are_not_delivered(
    accept_mesh: MeshThread, zone: LoopbackDns
) -> None:
    account_id, key = accept_mesh.create_account()
    nats_url = accept_mesh.settings.nats_url
    with accept_mesh.client(key) as client:
        create_verified_domain(client, zone, "example.test")
        client.feedback.PutSuppressedDestination(
            feedback_pb2.PutSuppressedDestinationRequest(
                email_address="Gone@Example.test", reason=feedback_pb2.SUPPRESSION_LIST_REASON_BOUNCE
            )
        )
        partly = client.sender.SendEmail(
            _simple("me@example.test", ["ok@example.test", "gone@example.test"])
        ).message_id
        only = client.sender.SendEmail(_simple("me@example.test", ["GONE@example.test"])).message_id
        assert sent_last_24_hours(client, 1) == 1
    queued = queued_messages(nats_url, account_id, wait_for=1)
    assert [(q.message_id, list(q.recipients)) for q in queued] == [(partly, ["ok@example.test"])]
    events = email_events(nats_url, account_id, until=lambda e: len(of_type(e, BOUNCE)) >= 2)
    bounces = sorted(
        (e.email.mail.message_id, r.email_address, e.email.bounce.bounce_type, e.email.bounce.bounce_sub_type)
        for e in of_type(events, BOUNCE)
        for r in e.email.bounce.bounced_recipients
    )
    on_list = ev.BOUNCE_SUB_TYPE_ON_ACCOUNT_SUPPRESSION_LIST
    assert bounces == sorted(
        [
            (partly, "gone@example.test", ev.BOUNCE_TYPE_PERMANENT, on_list),
            (only, "GONE@example.test", ev.BOUNCE_TYPE_PERMANENT, on_list),
        ]
    )
    assert {e.email.mail.message_id for e in of_type(events, SEND)} == {partly, only}


def test_idempotency_key_returns_the_same_message_and_queues_once(
    accept_mesh: MeshThread, zone: LoopbackDns
) -> None:
    account_id, key = accept_mesh.create_account()
    with accept_mesh.client(key) as client:
        create_verified_domain(client, zone, "example.test")
        request = _simple("me@example.test", ["a@example.test"], request_id="order-1234-confirmation")
        first = client.sender.SendEmail(request).message_id
        again = client.sender.SendEmail(request).message_id
        assert again == first
        changed = _simple("me@example.test", ["b@example.test"], request_id="order-1234-confirmation")
        code, reason, _, metadata = refusal(lambda: client.sender.SendEmail(changed))
        assert (code, reason, metadata["field"]) == (
            grpc.StatusCode.INVALID_ARGUMENT,
            "IDEMPOTENCY_KEY_REUSED",
            "request_id",
        )
        # A refused call does not use its key up.
        bad = _simple("me@unverified.test", ["a@example.test"], request_id="retry-after-fix")
        assert refusal(lambda: client.sender.SendEmail(bad))[1] == "MESSAGE_REJECTED"
        fixed = _simple("me@unverified.test", ["a@example.test"], request_id="retry-after-fix")
        fixed.from_email_address = "me@example.test"
        # The key belongs to the refused request only while... it was refused: now it is free.
        second = client.sender.SendEmail(fixed).message_id
        assert second != first
        assert client.sender.SendEmail(fixed).message_id == second
    queued = queued_messages(accept_mesh.settings.nats_url, account_id, wait_for=2)
    assert sorted(q.message_id for q in queued) == sorted([first, second])


def test_bulk_email_gives_one_result_per_entry(accept_mesh: MeshThread, zone: LoopbackDns) -> None:
    account_id, key = accept_mesh.create_account()
    nats_url = accept_mesh.settings.nats_url
    with accept_mesh.client(key) as client:
        create_verified_domain(client, zone, "example.test")
        client.sender.CreateEmailTemplate(
            pb.CreateEmailTemplateRequest(
                template_name="promo",
                template_content=pb.EmailTemplateContent(
                    subject="{{greeting}}, {{name}}", text="Code {{code}}", html="<b>{{code}}</b>"
                ),
            )
        )

        def entry(to: str, data: object) -> pb.BulkEmailEntry:
            return pb.BulkEmailEntry(
                destination=pb.Destination(to_addresses=[to]),
                replacement_email_content=pb.ReplacementEmailContent(
                    replacement_template=pb.ReplacementTemplate(
                        replacement_template_data=data if isinstance(data, str) else json.dumps(data)
                    )
                ),
            )

        request = pb.SendBulkEmailRequest(
            from_email_address="Promo <promo@example.test>",
            default_content=pb.BulkEmailContent(
                template=pb.Template(template_name="promo", template_data='{"greeting": "Hi", "code": "X"}')
            ),
            default_email_tags=[pb.MessageTag(name="batch", value="b1")],
            bulk_email_entries=[
                entry("ann@example.test", {"name": "Ann"}),
                entry("bob@example.test", {"name": "Bob", "greeting": "Hello", "code": "B0B"}),
                entry("not an address", {"name": "X"}),
                entry("cy@example.test", {}),  # no name: a rendering failure
                entry("dee@elsewhere.test", {"name": "Dee"}),  # unverified in the sandbox
                entry("eve@example.test", "{broken"),
            ],
        )
        results = client.sender.SendBulkEmail(request).bulk_email_entry_results
        statuses = [pb.BulkEmailStatus.Name(r.status).removeprefix("BULK_EMAIL_STATUS_") for r in results]
        assert statuses == [
            "SUCCESS",
            "SUCCESS",
            "INVALID_PARAMETER",
            "INVALID_PARAMETER",
            "MESSAGE_REJECTED",
            "INVALID_PARAMETER",
        ]
        assert all(r.message_id for r in results[:2]) and not any(r.message_id for r in results[2:])
        assert "Attribute 'name' is not present" in results[3].error
        # Too many entries, or an unknown template, refuse the whole call.
        too_many = pb.SendBulkEmailRequest(
            from_email_address="promo@example.test",
            default_content=request.default_content,
            bulk_email_entries=[entry(f"u{i}@example.test", {"name": "u"}) for i in range(51)],
        )
        code, _, _, metadata = refusal(lambda: client.sender.SendBulkEmail(too_many))
        assert (code, metadata["field"]) == (grpc.StatusCode.INVALID_ARGUMENT, "bulk_email_entries")
        unknown = pb.SendBulkEmailRequest(
            from_email_address="promo@example.test",
            default_content=pb.BulkEmailContent(template=pb.Template(template_name="nope")),
            bulk_email_entries=[entry("ann@example.test", {})],
        )
        code, reason, _, _ = refusal(lambda: client.sender.SendBulkEmail(unknown))
        assert (code, reason) == (grpc.StatusCode.NOT_FOUND, "TEMPLATE_DOES_NOT_EXIST")

    queued = {q.message_id: q for q in queued_messages(nats_url, account_id, wait_for=2)}
    assert set(queued) == {results[0].message_id, results[1].message_id}
    ann, bob = (_parse(queued[r.message_id].mime) for r in results[:2])
    assert (ann["Subject"], ann["To"]) == ("Hi, Ann", "ann@example.test")
    assert bob["Subject"] == "Hello, Bob" and b"B0B" in queued[results[1].message_id].mime
    assert [(t.name, t.value) for t in queued[results[0].message_id].tags] == [("batch", "b1")]
    events = email_events(nats_url, account_id, until=lambda e: len(of_type(e, RENDERING_FAILURE)) >= 1)
    failure = of_type(events, RENDERING_FAILURE)[0].email
    assert failure.rendering_failure.template_name == "promo"
    assert "name" in failure.rendering_failure.error_message
    assert list(failure.mail.destination) == ["cy@example.test"]


def test_rendering_failure_of_a_single_send_is_reported_and_an_event(
    accept_mesh: MeshThread, zone: LoopbackDns
) -> None:
    account_id, key = accept_mesh.create_account()
    with accept_mesh.client(key) as client:
        create_verified_domain(client, zone, "example.test")
        client.sender.CreateEmailTemplate(
            pb.CreateEmailTemplateRequest(
                template_name="hello",
                template_content=pb.EmailTemplateContent(subject="Hi {{name}}", text="x"),
            )
        )
        request = _simple(
            "me@example.test",
            ["a@example.test"],
            content=pb.EmailContent(template=pb.Template(template_name="hello", template_data="{}")),
        )
        code, reason, _, metadata = refusal(lambda: client.sender.SendEmail(request))
        assert (code, reason, metadata["field"]) == (
            grpc.StatusCode.INVALID_ARGUMENT,
            "RENDERING_FAILURE",
            "content.template.template_data",
        )
    events = email_events(
        accept_mesh.settings.nats_url, account_id, until=lambda e: bool(of_type(e, RENDERING_FAILURE))
    )
    assert of_type(events, RENDERING_FAILURE)[0].email.rendering_failure.template_name == "hello"
    assert queued_messages(accept_mesh.settings.nats_url, account_id, timeout=0.5) == []


def test_sends_arrive_dkim_signed_over_smtp(
    start_mesh: MeshFactory, zone: LoopbackDns, nats_url: str
) -> None:
    """The whole way: SendEmail / SendBulkEmail -> work queue -> delivery worker -> MX -> SMTP."""
    port = free_port("127.0.0.2")
    with SmtpServer("127.0.0.2", port) as smtp:
        zone.add_mx("example.test", "mx.example.test", 10)
        zone.add_a("mx.example.test", "127.0.0.2")
        mesh = start_mesh(
            **_settings(
                zone,
                delivery_mode="mx",
                delivery_workers=4,
                smtp_port=port,
                smtp_helo_name="out.postmesh.test",
                default_bounce_domain="bounces.postmesh.test",
            )
        )
        _, key = mesh.create_account()
        with mesh.client(key) as client:
            create_verified_domain(client, zone, "example.test")
            ids = [
                client.sender.SendEmail(_simple("News <news@example.test>", ["a@example.test"])).message_id
            ]
            raw = b"From: news@example.test\r\nTo: b@example.test\r\nSubject: raw\r\n\r\nraw body\r\n"
            ids.append(
                client.sender.SendEmail(
                    pb.SendEmailRequest(content=pb.EmailContent(raw=pb.RawMessage(data=raw)))
                ).message_id
            )
            client.sender.CreateEmailTemplate(
                pb.CreateEmailTemplateRequest(
                    template_name="t",
                    template_content=pb.EmailTemplateContent(subject="Hi {{n}}", html="<p>{{n}}</p>"),
                )
            )
            bulk = client.sender.SendBulkEmail(
                pb.SendBulkEmailRequest(
                    from_email_address="news@example.test",
                    default_content=pb.BulkEmailContent(
                        template=pb.Template(template_name="t", template_data='{"n": 1}')
                    ),
                    bulk_email_entries=[
                        pb.BulkEmailEntry(destination=pb.Destination(to_addresses=[f"c{i}@example.test"]))
                        for i in range(3)
                    ],
                )
            ).bulk_email_entry_results
            ids += [r.message_id for r in bulk]
            ids.append(
                client.sender.SendEmail(
                    pb.SendEmailRequest(
                        from_email_address="news@example.test",
                        destination=pb.Destination(to_addresses=["d@example.test"]),
                        content=pb.EmailContent(
                            template=pb.Template(template_name="t", template_data='{"n": "templated"}')
                        ),
                    )
                ).message_id
            )
        deadline = time.monotonic() + 60
        while len(smtp.received) < len(ids) and time.monotonic() < deadline:
            time.sleep(0.1)
        received = smtp.received
        assert sorted(r.message_id for r in received) == sorted(f"<{i}@mail.postmesh.test>" for i in ids)
        lookup = dkimpy_dns(zone)
        perl = perl_dkim_available()  # Debian's libmail-dkim-perl, where installed
        for message in received:
            assert b"DKIM-Signature:" in message.data
            assert dkim.verify(message.data, dnsfunc=lookup), message.data[:400]
            if perl:
                assert perl_dkim_result(message.data, zone.port) == "pass", message.data[:400]
            assert message.mail_from.endswith("@bounces.postmesh.test")
            assert b"\nBcc:" not in message.data


def test_bulk_entries_over_the_rate_or_quota_are_refused_one_by_one(
    accept_mesh: MeshThread, zone: LoopbackDns
) -> None:
    account_id, key = accept_mesh.create_account()
    with accept_mesh.client(key) as client, accept_mesh.admin() as admin:
        create_verified_domain(client, zone, "example.test")
        client.sender.CreateEmailTemplate(
            pb.CreateEmailTemplateRequest(
                template_name="t", template_content=pb.EmailTemplateContent(subject="s", text="t")
            )
        )

        def bulk(count: int) -> list[str]:
            results = client.sender.SendBulkEmail(
                pb.SendBulkEmailRequest(
                    from_email_address="news@example.test",
                    default_content=pb.BulkEmailContent(template=pb.Template(template_name="t")),
                    bulk_email_entries=[
                        pb.BulkEmailEntry(destination=pb.Destination(to_addresses=[f"u{i}@example.test"]))
                        for i in range(count)
                    ],
                )
            ).bulk_email_entry_results
            return [pb.BulkEmailStatus.Name(r.status).removeprefix("BULK_EMAIL_STATUS_") for r in results]

        admin.quota.PauseAccountSending(
            quota_pb2.PauseAccountSendingRequest(account_id=account_id, reason="test")
        )
        assert bulk(1) == ["ACCOUNT_SENDING_PAUSED"]
        admin.quota.ReinstateAccountSending(
            quota_pb2.ReinstateAccountSendingRequest(account_id=account_id, reason="test")
        )
        # One message a second, a burst of one: the first entry goes, the others are throttled.
        admin.quota.SetAccountQuota(
            quota_pb2.SetAccountQuotaRequest(
                account_id=account_id, max_24_hour_send=3, max_send_rate=1, reason="test"
            )
        )
        statuses = bulk(3)
        assert statuses[0] == "SUCCESS" and set(statuses[1:]) == {"ACCOUNT_THROTTLED"}
        admin.quota.SetAccountQuota(
            quota_pb2.SetAccountQuotaRequest(
                account_id=account_id, max_24_hour_send=3, max_send_rate=1000, reason="test"
            )
        )
        # The sender's quota client remembers a refusal until its retry delay (a second at most).
        time.sleep(1.5)
        # Two more fit in the 24-hour quota of three; the rest do not.
        assert bulk(4) == [
            "SUCCESS",
            "SUCCESS",
            "ACCOUNT_DAILY_QUOTA_EXCEEDED",
            "ACCOUNT_DAILY_QUOTA_EXCEEDED",
        ]
    assert len(queued_messages(accept_mesh.settings.nats_url, account_id, wait_for=3)) == 3


def test_a_deleted_identity_stops_sending_at_once(accept_mesh: MeshThread, zone: LoopbackDns) -> None:
    """The sender keeps identity's answers for a while; an IdentityChanged event drops them."""
    _, key = accept_mesh.create_account()
    with accept_mesh.client(key) as client:
        create_verified_domain(client, zone, "example.test")
        request = _simple("me@example.test", ["a@example.test"])
        client.sender.SendEmail(request)
        client.sender.SendEmail(request)  # answered from what the sender kept
        client.identity.DeleteEmailIdentity(
            identity_pb2.DeleteEmailIdentityRequest(email_identity="example.test")
        )
        # The event reaches the sender as the delete returns; allow it a moment under load (what
        # is kept would otherwise live on for CACHE_SECONDS, longer than this wait).
        deadline = time.monotonic() + 10
        while True:
            try:
                client.sender.SendEmail(request)
            except grpc.RpcError as exc:
                assert exc.code() == grpc.StatusCode.FAILED_PRECONDITION
                break
            assert time.monotonic() < deadline, "still sending from a deleted identity"
            time.sleep(0.2)


def test_sends_past_the_in_flight_limit_are_refused_at_once_and_a_retry_sends_once(
    start_mesh: MeshFactory, zone: LoopbackDns
) -> None:
    """SEND_MAX_IN_FLIGHT: 40 SendEmail calls at once against a limit of 3: the excess is refused
    with UNAVAILABLE SERVER_BUSY and a retry delay, before anything is claimed or queued; retried with
    their request_id, every message ends up queued exactly once."""
    mesh = start_mesh(**_settings(zone, delivery_workers=0, send_max_in_flight=3))
    account_id, key = mesh.create_account()
    with mesh.client(key) as client:
        create_verified_domain(client, zone, "example.test")
    requests = [
        _simple("news@example.test", [f"rcpt{n}@example.test"], request_id=f"busy-{n}") for n in range(40)
    ]
    metadata = (("authorization", f"Bearer {key}"),)

    async def send(indexes: list[int]) -> dict[int, object]:
        async with aio.insecure_channel(mesh.address) as channel:
            stub = sender_pb2_grpc.SenderServiceStub(channel)
            answers = await asyncio.gather(
                *(stub.SendEmail(requests[i], metadata=metadata, timeout=30) for i in indexes),
                return_exceptions=True,
            )
        return dict(zip(indexes, answers, strict=True))

    first = mesh.run(send(list(range(40))))
    refused = [i for i, answer in first.items() if isinstance(answer, aio.AioRpcError)]
    accepted = {i: a.message_id for i, a in first.items() if isinstance(a, pb.SendEmailResponse)}
    assert refused and accepted, first
    for i in refused:
        error = first[i]
        assert isinstance(error, aio.AioRpcError)
        details = error_details(error)
        assert (details.code, details.reason) == (grpc.StatusCode.UNAVAILABLE, "SERVER_BUSY"), details
        assert "SEND_MAX_IN_FLIGHT=3" in details.message
        assert details.retry_after_seconds == 1.0
    # Nothing of a refused call was claimed or queued: its retry (one at a time here) sends it.
    for i in refused:
        again = mesh.run(send([i]))[i]
        assert isinstance(again, pb.SendEmailResponse), again
        accepted[i] = again.message_id
    # A retry of an accepted one gives its message id back, not a second message.
    some = min(accepted)
    again = mesh.run(send([some]))[some]
    assert isinstance(again, pb.SendEmailResponse) and again.message_id == accepted[some]
    queued = queued_messages(mesh.settings.nats_url, account_id, wait_for=40, timeout=15)
    assert sorted(q.message_id for q in queued) == sorted(accepted.values())


def test_only_sends_without_a_request_id_are_queued_once(accept_mesh: MeshThread, zone: LoopbackDns) -> None:
    """`queued_once` (the delivery worker then skips the first-copy ledger) marks exactly the messages
    of calls without a request_id: a retry of such a call makes a new message, while a call with one
    may queue its message id again after JetStream's duplicate window."""
    account_id, key = accept_mesh.create_account()
    with accept_mesh.client(key) as client:
        create_verified_domain(client, zone, "example.test")
        plain = client.sender.SendEmail(_simple("a@example.test", ["r1@example.test"])).message_id
        keyed = client.sender.SendEmail(
            _simple("a@example.test", ["r2@example.test"], request_id="k-1")
        ).message_id
        client.sender.CreateEmailTemplate(
            pb.CreateEmailTemplateRequest(
                template_name="hello", template_content=pb.EmailTemplateContent(subject="Hi", text="Hello")
            )
        )
        bulk = pb.SendBulkEmailRequest(
            from_email_address="a@example.test",
            default_content=pb.BulkEmailContent(
                template=pb.Template(template_name="hello", template_data="{}")
            ),
            bulk_email_entries=[
                pb.BulkEmailEntry(destination=pb.Destination(to_addresses=["r3@example.test"]))
            ],
        )
        [bulk_plain] = client.sender.SendBulkEmail(bulk).bulk_email_entry_results
        bulk.request_id = "k-2"
        bulk.bulk_email_entries[0].destination.to_addresses[0] = "r4@example.test"
        [bulk_keyed] = client.sender.SendBulkEmail(bulk).bulk_email_entry_results
    queued = queued_messages(accept_mesh.settings.nats_url, account_id, wait_for=4)
    assert {q.message_id: q.queued_once for q in queued} == {
        plain: True,
        keyed: False,
        bulk_plain.message_id: True,
        bulk_keyed.message_id: False,
    }
