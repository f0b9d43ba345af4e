"""SendEmail, SendBulkEmail and templates through the whole mesh: real gRPC, NATS and databases.

What was queued is read off the POSTMESH_OUTBOUND work queue and the events off POSTMESH_EVENTS with
real NATS consumers.
"""

from __future__ import annotations

from collections.abc import Iterator
from email import message_from_bytes, policy
from pathlib import Path

import grpc
import pytest

from postmesh.events.v1 import events_pb2
from postmesh.quota.v1 import quota_pb2
from postmesh.sender.v1 import sender_pb2 as pb
from postmesh.testing import MeshThread
from tests.conftest import MeshFactory
from tests.sending_helpers import (
    email_events,
    of_type,
    own_nats_server,
    queued_messages,
    refusal,
    sent_last_24_hours,
)

# Sandbox accounts send one message a second by default: too slow for a test. No delivery workers:
# accepted messages stay on the work queue for the test to read.
FAST = {"sandbox_max_send_rate": 1000.0, "production_max_send_rate": 1000.0, "delivery_workers": 0}


@pytest.fixture
def nats_url(tmp_path: Path) -> Iterator[str]:
    """Overrides the suite's shared server for this module (and start_mesh): see own_nats_server."""
    with own_nats_server(tmp_path / "nats") as url:
        yield url


@pytest.fixture
def sending_mesh(start_mesh: MeshFactory) -> MeshThread:
    return start_mesh(**FAST)


def _simple(
    sender: str = "sender@example.test",
    to: tuple[str, ...] = ("rcpt@example.test",),
    subject: str = "Hello",
    text: str = "Hi there",
    **fields: object,
) -> pb.SendEmailRequest:
    request = pb.SendEmailRequest(
        from_email_address=sender,
        destination=pb.Destination(to_addresses=list(to)),
        content=pb.EmailContent(
            simple=pb.Message(subject=pb.Content(data=subject), body=pb.Body(text=pb.Content(data=text)))
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


def _template(name: str, data: str = "{}") -> pb.EmailContent:
    return pb.EmailContent(template=pb.Template(template_name=name, template_data=data))


WELCOME = pb.EmailTemplateContent(
    subject='Welcome, {{default name "friend"}}',
    text="Hello {{name}}.{{#each items}} {{this}}{{/each}}",
    html="<p>Hello {{name}}</p>{{#if vip}}<b>VIP</b>{{else}}<i>regular</i>{{/if}}{{{footer}}}",
)


def test_templates_and_test_render(sending_mesh: MeshThread) -> None:
    _, key = sending_mesh.create_account()
    with sending_mesh.client(key) as client:
        client.sender.CreateEmailTemplate(
            pb.CreateEmailTemplateRequest(template_name="welcome", template_content=WELCOME)
        )
        reply = client.sender.TestRenderEmailTemplate(
            pb.TestRenderEmailTemplateRequest(
                template_name="welcome",
                template_data='{"name": "<Ada>", "items": ["a", "b"], "vip": true, "footer": "<hr>"}',
            )
        )
        assert reply.subject == "Welcome, <Ada>"
        assert reply.text == "Hello <Ada>. a b"
        assert reply.html == "<p>Hello &lt;Ada&gt;</p><b>VIP</b><hr>"
        rendered = message_from_bytes(reply.rendered_template.encode(), policy=policy.default)
        assert rendered["Subject"] == "Welcome, <Ada>"
        assert rendered.get_content_type() == "multipart/alternative"

        # Malformed templates are refused when stored, naming the part.
        for content, field in (
            (pb.EmailTemplateContent(subject="Hi {{name", text="x"), "template_content.subject"),
            (pb.EmailTemplateContent(subject="Hi", html="{{#if a}}open"), "template_content.html"),
            (
                pb.EmailTemplateContent(subject="Hi\r\nBcc: x@example.test", text="x"),
                "template_content.subject",
            ),
        ):
            create = pb.CreateEmailTemplateRequest(template_name="bad", template_content=content)
            code, _, _, metadata = refusal(lambda: client.sender.CreateEmailTemplate(create))  # noqa: B023
            assert (code, metadata.get("field")) == (grpc.StatusCode.INVALID_ARGUMENT, field)
        code, reason, _, _ = refusal(
            lambda: client.sender.UpdateEmailTemplate(
                pb.UpdateEmailTemplateRequest(
                    template_name="welcome",
                    template_content=pb.EmailTemplateContent(subject="{{/if}}", text="x"),
                )
            )
        )
        assert (code, reason) == (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_TEMPLATE")

        # Rendering problems: missing data, data that is not a JSON object, no such template.
        for data, reason in (
            ('{"items": []}', "RENDERING_FAILURE"),
            ("[1, 2]", "BAD_REQUEST"),
            ("{x", "BAD_REQUEST"),
        ):
            render = pb.TestRenderEmailTemplateRequest(template_name="welcome", template_data=data)
            code, got, _, metadata = refusal(lambda: client.sender.TestRenderEmailTemplate(render))  # noqa: B023
            assert (code, got, metadata["field"]) == (
                grpc.StatusCode.INVALID_ARGUMENT,
                reason,
                "template_data",
            )
        code, reason, _, _ = refusal(
            lambda: client.sender.TestRenderEmailTemplate(
                pb.TestRenderEmailTemplateRequest(template_name="nope")
            )
        )
        assert (code, reason) == (grpc.StatusCode.NOT_FOUND, "TEMPLATE_DOES_NOT_EXIST")


RAW_NO_FROM = b"To: rcpt@example.test\r\nSubject: x\r\n\r\nbody\r\n"
RAW_WITH_EXE = (
    b"From: sender@example.test\r\nTo: r@example.test\r\nSubject: x\r\nMIME-Version: 1.0\r\n"
    b'Content-Type: multipart/mixed; boundary="b"\r\n\r\n'
    b"--b\r\nContent-Type: text/plain\r\n\r\nhi\r\n"
    b"--b\r\nContent-Type: application/octet-stream\r\n"
    b'Content-Disposition: attachment; filename="run.exe"\r\n'
    b"Content-Transfer-Encoding: base64\r\n\r\nTVqQAA==\r\n--b--\r\n"
)


def _too_many() -> pb.SendEmailRequest:
    request = _simple(to=tuple(f"r{i}@example.test" for i in range(30)))
    request.destination.cc_addresses.extend(f"c{i}@example.test" for i in range(15))
    request.destination.bcc_addresses.extend(f"b{i}@example.test" for i in range(6))
    return request


BAD_REQUESTS: list[tuple[str, pb.SendEmailRequest, str, str]] = [
    ("51 recipients", _too_many(), "MESSAGE_REJECTED", "destination"),
    ("no recipient", _simple(to=()), "BAD_REQUEST", "destination"),
    ("CRLF in subject", _simple(subject="Hi\r\nBcc: victim@example.test"), "BAD_REQUEST", "subject"),
    (
        "CRLF from template data into the subject",
        _simple(
            content=_template(
                "welcome", '{"name": "x\\r\\nBcc: victim@example.test", "items": [], "footer": ""}'
            )
        ),
        "BAD_REQUEST",
        "subject",
    ),
    ("LF in subject", _simple(subject="Hi\nX-Evil: 1"), "BAD_REQUEST", "subject"),
    (
        "CRLF in an address",
        _simple(to=("rcpt@example.test\r\nBcc: victim@example.test",)),
        "BAD_REQUEST",
        "destination.to_addresses[0]",
    ),
    ("CRLF in From", _simple(sender="Me\r\n <sender@example.test>"), "BAD_REQUEST", "from_email_address"),
    (
        "CRLF in Reply-To",
        _simple(reply_to_addresses=["a@example.test\nBcc: v@example.test"]),
        "BAD_REQUEST",
        "reply_to_addresses[0]",
    ),
    (
        "CRLF in a custom header",
        pb.SendEmailRequest(
            from_email_address="sender@example.test",
            destination=pb.Destination(to_addresses=["rcpt@example.test"]),
            content=pb.EmailContent(
                simple=pb.Message(
                    subject=pb.Content(data="Hi"),
                    body=pb.Body(text=pb.Content(data="x")),
                    headers=[pb.MessageHeader(name="X-Campaign", value="a\r\nBcc: v@example.test")],
                )
            ),
        ),
        "BAD_REQUEST",
        "content.simple.headers",
    ),
    ("invalid To", _simple(to=("not-an-address",)), "BAD_REQUEST", "destination.to_addresses[0]"),
    (
        "invalid Cc domain",
        _simple(
            destination=pb.Destination(to_addresses=["a@example.test"], cc_addresses=["b@exa mple.test"])
        ),
        "BAD_REQUEST",
        "destination.cc_addresses[0]",
    ),
    ("invalid From", _simple(sender="nobody"), "BAD_REQUEST", "from_email_address"),
    (
        "missing content",
        pb.SendEmailRequest(
            from_email_address="sender@example.test",
            destination=pb.Destination(to_addresses=["r@example.test"]),
        ),
        "BAD_REQUEST",
        "content",
    ),
    ("missing body", _simple(text=""), "BAD_REQUEST", "content.simple.body"),
    ("missing subject", _simple(subject=""), "BAD_REQUEST", "content.simple.subject"),
    (
        "unknown charset",
        pb.SendEmailRequest(
            from_email_address="sender@example.test",
            destination=pb.Destination(to_addresses=["r@example.test"]),
            content=pb.EmailContent(
                simple=pb.Message(
                    subject=pb.Content(data="Hi"), body=pb.Body(text=pb.Content(data="x", charset="klingon"))
                )
            ),
        ),
        "BAD_REQUEST",
        "charset",
    ),
    (
        "bad tag",
        _simple(email_tags=[pb.MessageTag(name="has space", value="x")]),
        "BAD_REQUEST",
        "email_tags",
    ),
    (
        "bad configuration set",
        _simple(configuration_set_name="no/slash"),
        "BAD_REQUEST",
        "configuration_set_name",
    ),
    ("bad request id", _simple(request_id="with space"), "BAD_REQUEST", "request_id"),
    (
        "malformed template data",
        _simple(content=_template("welcome", "{not json")),
        "BAD_REQUEST",
        "content.template.template_data",
    ),
    (
        "template data not an object",
        _simple(content=_template("welcome", '"text"')),
        "BAD_REQUEST",
        "content.template.template_data",
    ),
    (
        "raw without From",
        _simple(sender="", content=pb.EmailContent(raw=pb.RawMessage(data=RAW_NO_FROM))),
        "BAD_REQUEST",
        "content.raw.data",
    ),
    (
        "raw not MIME",
        _simple(sender="", content=pb.EmailContent(raw=pb.RawMessage(data=b"\x00\x01garbage"))),
        "BAD_REQUEST",
        "content.raw.data",
    ),
    (
        "raw with an .exe",
        _simple(sender="", content=pb.EmailContent(raw=pb.RawMessage(data=RAW_WITH_EXE))),
        "MESSAGE_REJECTED",
        "content.raw.data",
    ),
]


@pytest.mark.parametrize("request_", [r[1] for r in BAD_REQUESTS], ids=[r[0] for r in BAD_REQUESTS])
def test_bad_input_is_invalid_argument_naming_the_field(
    sending_mesh: MeshThread, request_: pb.SendEmailRequest
) -> None:
    expected = {id(r[1]): r for r in BAD_REQUESTS}[id(request_)]
    account_id, key = sending_mesh.create_account()
    with sending_mesh.client(key) as client:
        client.sender.CreateEmailTemplate(
            pb.CreateEmailTemplateRequest(template_name="welcome", template_content=WELCOME)
        )
        code, reason, message, metadata = refusal(lambda: client.sender.SendEmail(request_))
        assert (code, reason, metadata.get("field")) == (
            grpc.StatusCode.INVALID_ARGUMENT,
            expected[2],
            expected[3],
        ), message
        # Nothing was counted against the quota.
        assert sent_last_24_hours(client, 0) == 0
    assert queued_messages(sending_mesh.settings.nats_url, account_id, timeout=0.5) == []


def test_oversized_raw_message_is_rejected(sending_mesh: MeshThread) -> None:
    account_id, key = sending_mesh.create_account()
    big = (
        b"From: sender@example.test\r\nTo: r@example.test\r\nSubject: big\r\n\r\n"
        + (b"x" * 998 + b"\r\n") * 42_000
    )
    with sending_mesh.client(key) as client:
        code, reason, message, metadata = refusal(
            lambda: client.sender.SendEmail(
                pb.SendEmailRequest(content=pb.EmailContent(raw=pb.RawMessage(data=big)))
            )
        )
    assert (code, reason, metadata["field"]) == (
        grpc.StatusCode.INVALID_ARGUMENT,
        "MESSAGE_REJECTED",
        "content",
    )
    assert "more than 41943040 bytes" in message
    assert queued_messages(sending_mesh.settings.nats_url, account_id, timeout=0.5) == []


def test_paused_account_and_exhausted_quota_are_refused(sending_mesh: MeshThread) -> None:
    account_id, key = sending_mesh.create_account()
    with sending_mesh.client(key) as client, sending_mesh.admin() as admin:
        admin.quota.PauseAccountSending(
            quota_pb2.PauseAccountSendingRequest(account_id=account_id, reason="test")
        )
        code, reason, _, _ = refusal(lambda: client.sender.SendEmail(_simple()))
        assert (code, reason) == (grpc.StatusCode.FAILED_PRECONDITION, "ACCOUNT_SENDING_PAUSED")
        admin.quota.ReinstateAccountSending(
            quota_pb2.ReinstateAccountSendingRequest(account_id=account_id, reason="test")
        )
        admin.quota.SetAccountQuota(
            quota_pb2.SetAccountQuotaRequest(
                account_id=account_id, max_24_hour_send=1, max_send_rate=1000, reason="t"
            )
        )
        code, reason, message, _ = refusal(
            lambda: client.sender.SendEmail(_simple(to=("a@example.test", "b@example.test")))
        )
        assert (code, reason) == (grpc.StatusCode.RESOURCE_EXHAUSTED, "DAILY_QUOTA_EXCEEDED")
        assert "Daily message quota exceeded" in message
    assert queued_messages(sending_mesh.settings.nats_url, account_id, timeout=0.5) == []
    assert (
        of_type(email_events(sending_mesh.settings.nats_url, account_id), events_pb2.EMAIL_EVENT_TYPE_SEND)
        == []
    )
