"""Hostile mail through the whole mesh: simple, raw and templated SendEmail with generated subjects,
bodies, charsets, display names, custom headers, line endings and MIME structure, delivered over
SMTP to an aiosmtpd receiver found through MX. Whatever is accepted must arrive, DKIM-signed, as
valid RFC 5322 (lines <= 998, 7-bit header block, no Bcc disclosed, parseable); whatever is refused
is INVALID_ARGUMENT (or another answer a client can act on), never INTERNAL, UNKNOWN or a hang."""

from __future__ import annotations

import itertools
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import dkim
import grpc
import pytest
from hypothesis import given
from hypothesis import strategies as st

from postmesh.client import Client, error_details
from postmesh.common.natsserver import free_port
from postmesh.sender.v1 import sender_pb2 as pb
from postmesh.testing import MeshThread
from postmesh.testing_mail import LoopbackDns, SmtpServer
from tests.dkim_verifiers import dkimpy_dns
from tests.fuzz_helpers import EXAMPLES, NEVER, check_wire_message, fuzz_settings, hostile_text
from tests.identity_helpers import create_verified_domain
from tests.sending_helpers import own_nats_server

DOMAIN = "example.test"
_counter = itertools.count()


@dataclass
class Run:
    mesh: MeshThread
    client: Client
    smtp: SmtpServer
    zone: LoopbackDns
    # message id -> Bcc addresses of each accepted message
    accepted: dict[str, list[str]] = field(default_factory=dict)


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Run]:
    directory: Path = tmp_path_factory.mktemp("fuzz-mail")
    port = free_port("127.0.0.2")
    with (
        LoopbackDns() as zone,
        SmtpServer("127.0.0.2", port) as smtp,
        own_nats_server(directory / "nats") as url,
    ):
        zone.add_mx(DOMAIN, f"mx.{DOMAIN}", 10)
        zone.add_a(f"mx.{DOMAIN}", "127.0.0.2")
        with MeshThread(
            nats_url=url,
            data_dir=directory,
            sandbox_max_send_rate=100000.0,
            sandbox_max_24_hour_send=10**9,
            dns_resolver=zone.address,
            dns_check_poll_seconds=3600,
            dns_timeout_seconds=2,
            delivery_mode="mx",
            delivery_workers=2,
            smtp_port=port,
            message_id_domain="mail.postmesh.test",
        ) as mesh:
            _, key = mesh.create_account()
            with mesh.client(key) as client:
                create_verified_domain(client, zone, DOMAIN)
                yield Run(mesh, client, smtp, zone)


def _recipients() -> tuple[list[str], list[str]]:
    n = next(_counter)
    return [f"to{n}@{DOMAIN}"], [f"hidden{n}@{DOMAIN}"]


def _send(run: Run, request: pb.SendEmailRequest, bcc: list[str]) -> None:
    try:
        message_id = run.client.sender.SendEmail(request, timeout=60).message_id
    except grpc.RpcError as error:
        details = error_details(error)
        assert details.code not in NEVER, (details.code, details.message, request)
        assert details.code in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.FAILED_PRECONDITION), (
            details.code,
            details.message,
        )
        assert details.reason, details.message
        assert len(details.message) <= 2048
        return
    run.accepted[message_id] = bcc


def _check_delivered(run: Run) -> None:
    """Every accepted message arrived once, signed, as valid RFC 5322 without its Bcc."""
    wanted = {f"<{m}@mail.postmesh.test>": bcc for m, bcc in run.accepted.items()}
    if EXAMPLES >= 25:  # the generators lean to mail a sender would send: some of it is accepted
        assert wanted, "nothing was accepted: the generators no longer produce sendable mail"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        arrived = {r.message_id for r in run.smtp.received}
        if set(wanted) <= arrived:
            break
        time.sleep(0.2)
    received = {r.message_id: r for r in run.smtp.received if r.message_id in wanted}
    missing = set(wanted) - set(received)
    assert not missing, f"accepted but never delivered: {sorted(missing)[:5]}"
    lookup = dkimpy_dns(run.zone)
    for message_id, bcc in wanted.items():
        data = received[message_id].data
        check_wire_message(data, bcc=bcc)
        assert dkim.verify(data, dnsfunc=lookup), data[:600]
    run.accepted.clear()


_CHARSETS = st.sampled_from(
    ["UTF-8"] * 12
    + ["utf-8", "iso-8859-1", "us-ascii", "windows-1252", "base64", "rot13", "zlib", "hex", "uu"]
    + ["quopri", "bz2", "utf-8\r\nX-Injected: 1", "utf-8\nX: y", "utf-8; x=y", "", "punycode", "idna"]
    + ["utf-7", "utf-16", "utf-32", "unicode_escape", "raw_unicode_escape", "mbcs", "x" * 300]
)


@fuzz_settings()
@given(
    subject=hostile_text(),
    text=hostile_text(200),
    html=hostile_text(200),
    charset=_CHARSETS,
    display=hostile_text(20),
    header_value=hostile_text(60),
    header_name=st.sampled_from(
        ["X-Custom"] * 4 + ["X-Long-" + "a" * 60, "List-Unsubscribe", "X-Ünicode", "Bad Name"]
    ),
)
def _simple_examples(
    run: Run,
    subject: str,
    text: str,
    html: str,
    charset: str,
    display: str,
    header_name: str,
    header_value: str,
) -> None:
    to, bcc = _recipients()
    request = pb.SendEmailRequest(
        from_email_address=f'"{display}" <news@{DOMAIN}>' if display else f"news@{DOMAIN}",
        destination=pb.Destination(to_addresses=to, bcc_addresses=bcc),
        content=pb.EmailContent(
            simple=pb.Message(
                subject=pb.Content(data=subject, charset=charset),
                body=pb.Body(text=pb.Content(data=text, charset=charset), html=pb.Content(data=html)),
                headers=[pb.MessageHeader(name=header_name, value=header_value)],
            )
        ),
    )
    _send(run, request, bcc)


def test_fuzz_simple_messages(run: Run) -> None:
    _simple_examples(run)
    _check_delivered(run)


_LINE_ENDINGS = st.sampled_from(["\r\n", "\n", "\r\n", "\n", "\r\n", "\r", "\r\r\n", "\n\r"])


@st.composite
def _mime_tree(draw: st.DrawFn, depth: int) -> str:
    if depth <= 0 or not draw(st.booleans()):
        body = draw(hostile_text(120))
        encoding = draw(st.sampled_from(["7bit", "8bit", "quoted-printable", "base64", "binary", "x-bogus"]))
        return f"Content-Type: text/plain; charset=utf-8\nContent-Transfer-Encoding: {encoding}\n\n{body}\n"
    boundary = f"b{depth}x{draw(st.integers(0, 999))}"
    parts = draw(st.lists(_mime_tree(depth - 1), min_size=1, max_size=2))
    inner = "".join(f"--{boundary}\n{part}\n" for part in parts)
    return f'Content-Type: multipart/mixed; boundary="{boundary}"\n\n{inner}--{boundary}--\n'


def _deep_multipart(depth: int) -> str:
    opening = "".join(f'Content-Type: multipart/mixed; boundary="d{i}"\n\n--d{i}\n' for i in range(depth))
    closing = "".join(f"\n--d{i}--\n" for i in reversed(range(depth)))
    return opening + "Content-Type: text/plain\n\ndeep\n" + closing


@fuzz_settings()
@given(
    ending=_LINE_ENDINGS,
    subject=hostile_text(),
    display=hostile_text(20),
    extra=st.lists(
        st.tuples(st.sampled_from(["X-A", "Sender", "Comments", "X-Long"]), hostile_text(60)), max_size=2
    ),
    tree=st.one_of(
        _mime_tree(3), _mime_tree(3), _mime_tree(3), st.sampled_from([100, 1000]).map(_deep_multipart)
    ),
    long_line=st.sampled_from([0, 0, 0, 0, 0, 980, 999, 5000]),
    with_bcc_header=st.booleans(),
)
def _raw_examples(
    run: Run,
    ending: str,
    subject: str,
    display: str,
    extra: list[tuple[str, str]],
    tree: str,
    long_line: int,
    with_bcc_header: bool,
) -> None:
    to, bcc = _recipients()
    lines = [f'From: "{display}" <news@{DOMAIN}>', f"To: {to[0]}", f"Subject: {subject}"]
    if with_bcc_header:
        lines.append(f"Bcc: {bcc[0]}")
    lines += [f"{name}: {value}" for name, value in extra]
    if long_line:
        lines.append("X-Filler: " + "y" * long_line)
    text = "\n".join(lines) + "\nMIME-Version: 1.0\n" + tree
    data = text.replace("\n", ending).encode("utf-8", "surrogatepass")
    request = pb.SendEmailRequest(
        destination=pb.Destination(to_addresses=to, bcc_addresses=bcc),
        content=pb.EmailContent(raw=pb.RawMessage(data=data)),
    )
    _send(run, request, bcc)


def test_fuzz_raw_messages(run: Run) -> None:
    _raw_examples(run)
    _check_delivered(run)


def _nested_each(depth: int) -> str:
    return "{{#each a}}" * depth + "{{this}}" + "{{/each}}" * depth


def _nested_data(depth: int) -> str:
    return '{"a": ' + "[" * depth + "1" + "]" * depth + "}"


@fuzz_settings()
@given(
    subject=st.one_of(hostile_text(), st.sampled_from(["{{name}}", "Hi {{{name}}}", "{{#if a}}x{{/if}}"])),
    html=st.one_of(hostile_text(200), st.integers(1, 1200).map(_nested_each)),
    data=st.one_of(
        st.dictionaries(
            st.sampled_from(["name", "a", "b"]), st.one_of(hostile_text(), st.integers()), max_size=3
        ).map(json.dumps),
        st.integers(1, 100_000).map(_nested_data),
        st.just('{"a": ' + json.dumps([list(range(40))] * 40) + "}"),
        hostile_text(),
    ),
)
def _template_examples(run: Run, subject: str, html: str, data: str) -> None:
    to, bcc = _recipients()
    name = f"t{next(_counter)}"
    try:
        run.client.sender.CreateEmailTemplate(
            pb.CreateEmailTemplateRequest(
                template_name=name, template_content=pb.EmailTemplateContent(subject=subject, html=html)
            ),
            timeout=60,
        )
    except grpc.RpcError as error:
        details = error_details(error)
        assert details.code is grpc.StatusCode.INVALID_ARGUMENT, (details.code, details.message)
        return
    request = pb.SendEmailRequest(
        from_email_address=f"news@{DOMAIN}",
        destination=pb.Destination(to_addresses=to, bcc_addresses=bcc),
        content=pb.EmailContent(template=pb.Template(template_name=name, template_data=data)),
    )
    _send(run, request, bcc)


def test_fuzz_templated_messages(run: Run) -> None:
    _template_examples(run)
    _check_delivered(run)
    with Client(run.mesh.address) as probe:
        assert probe.health_status() == "SERVING"


@fuzz_settings()
@given(
    entries=st.lists(
        st.tuples(
            st.dictionaries(st.sampled_from(["name", "a"]), hostile_text(), max_size=2).map(json.dumps),
            hostile_text(60),
        ),
        min_size=1,
        max_size=3,
    ),
)
def _bulk_examples(run: Run, entries: list[tuple[str, str]]) -> None:
    name = "bulk-fuzz"
    recipients = [_recipients() for _ in entries]
    request = pb.SendBulkEmailRequest(
        from_email_address=f"news@{DOMAIN}",
        default_content=pb.BulkEmailContent(
            template=pb.Template(template_name=name, template_data='{"name": "x"}')
        ),
        bulk_email_entries=[
            pb.BulkEmailEntry(
                destination=pb.Destination(to_addresses=to, bcc_addresses=bcc),
                replacement_email_content=pb.ReplacementEmailContent(
                    replacement_template=pb.ReplacementTemplate(replacement_template_data=data)
                ),
                replacement_headers=[pb.MessageHeader(name="X-Entry", value=header)],
            )
            for (data, header), (to, bcc) in zip(entries, recipients, strict=True)
        ],
    )
    try:
        results = run.client.sender.SendBulkEmail(request, timeout=60).bulk_email_entry_results
    except grpc.RpcError as error:
        details = error_details(error)
        assert details.code is grpc.StatusCode.INVALID_ARGUMENT, (details.code, details.message)
        return
    assert len(results) == len(entries)
    for result, (_, bcc) in zip(results, recipients, strict=True):
        if result.status == pb.BULK_EMAIL_STATUS_SUCCESS:
            run.accepted[result.message_id] = bcc
        else:
            assert result.error, result


def test_fuzz_bulk_messages(run: Run) -> None:
    run.client.sender.CreateEmailTemplate(
        pb.CreateEmailTemplateRequest(
            template_name="bulk-fuzz",
            template_content=pb.EmailTemplateContent(
                subject="Hi {{name}}", html='<p>{{name}} {{default a "x"}}</p>'
            ),
        ),
        timeout=60,
    )
    _bulk_examples(run)
    _check_delivered(run)


def test_a_raw_sender_header_must_name_an_identity_the_account_may_use(run: Run) -> None:
    def raw(sender: str) -> pb.SendEmailRequest:
        head = f"From: news@{DOMAIN}\r\nSender: {sender}\r\nTo: s@{DOMAIN}\r\nSubject: s\r\n"
        data = (head + "\r\nbody\r\n").encode()
        return pb.SendEmailRequest(content=pb.EmailContent(raw=pb.RawMessage(data=data)))

    with pytest.raises(grpc.RpcError) as excinfo:
        run.client.sender.SendEmail(raw("someone@unverified.test"), timeout=60)
    details = error_details(excinfo.value)
    assert (details.code, details.reason) == (grpc.StatusCode.FAILED_PRECONDITION, "MESSAGE_REJECTED")
    assert run.client.sender.SendEmail(raw(f"desk@{DOMAIN}"), timeout=60).message_id
