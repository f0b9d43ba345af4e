"""Each class of hostile input the fuzz suite found, as a property of the domain code (no server):
refused with INVALID_ARGUMENT naming the field, or made standard mail."""

from __future__ import annotations

import asyncio
import datetime as dt
import time

import pytest
from hypothesis import given
from hypothesis import strategies as st

from postmesh.common.errors import InvalidArgument
from postmesh.common.server import _may_hold_enums, _unknown_enum_value
from postmesh.common.service import SystemClock
from postmesh.feedback.v1 import configuration_sets_pb2 as cs
from postmesh.sender.v1 import sender_pb2
from services.sender import rendering
from services.sender.accept import Acceptor, RenderFailure
from services.sender.mime import (
    MAX_MIME_DEPTH,
    Addressing,
    Body,
    Header,
    Mailbox,
    build_message,
    finalize_raw,
    parse_mailbox,
    parse_raw,
)
from tests.fuzz_helpers import check_wire_message, fuzz_settings

NOW = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
SENDER = Addressing(Mailbox("", "news@example.test"), [Mailbox("", "to@example.test")])
CONTROLS = [chr(c) for c in [*range(0x00, 0x09), *range(0x0A, 0x20), 0x7F]]


def _build(body: Body) -> bytes:
    return build_message(SENDER, body, message_id="<id@example.test>", date=NOW)


@pytest.mark.parametrize(
    "name", ["base64", "rot13", "zlib", "hex", "uu", "quopri", "bz2", "idna", "punycode"]
)
def test_codecs_that_are_not_charsets_are_refused(name: str) -> None:
    with pytest.raises(InvalidArgument) as excinfo:
        _build(Body("s", "text", "", charset=name))
    assert excinfo.value.field == "charset"


@pytest.mark.parametrize("name", ["utf-8\r\nX-Injected: 1", "utf-8\n", "utf-8; format=flowed", "x" * 60, ""])
def test_charset_names_with_line_breaks_or_syntax_are_refused(name: str) -> None:
    with pytest.raises(InvalidArgument):
        _build(Body("s", "text", "", charset=name))


@pytest.mark.parametrize("control", CONTROLS)
def test_control_characters_in_subjects_header_values_and_display_names_are_refused(control: str) -> None:
    with pytest.raises(InvalidArgument):
        _build(Body(f"a{control}b", "text", ""))
    with pytest.raises(InvalidArgument):
        _build(Body("s", "text", "", headers=[Header("X-Custom", f"a{control}b")]))
    with pytest.raises(InvalidArgument):
        parse_mailbox(f'"a{control}b" <a@example.test>', field="from_email_address")


@fuzz_settings(200)
@given(
    subject=st.text(min_size=1, max_size=3000).filter(lambda s: s.strip()),
    value=st.text(max_size=3000),
    display=st.text(max_size=300),
)
def test_built_messages_are_standard_mail_or_refused(subject: str, value: str, display: str) -> None:
    addressing = Addressing(Mailbox(display, "news@example.test"), [Mailbox("", "to@example.test")])
    try:
        data = build_message(
            addressing,
            Body(subject, "text", "<p>html</p>", headers=[Header("X-Custom", value)]),
            message_id="<id@example.test>",
            date=NOW,
        )
    except InvalidArgument:
        return
    check_wire_message(data, bcc=[])


def test_a_long_unbroken_subject_is_encoded_into_short_lines() -> None:
    data = _build(Body("x" * 3000, "text", ""))
    check_wire_message(data, bcc=[])


def _raw(text: str) -> bytes:
    return text.encode()


def test_bare_cr_line_endings_are_refused_so_no_bcc_can_leak() -> None:
    data = _raw("From: a@example.test\rTo: b@example.test\rBcc: spy@example.test\rSubject: x\r\rbody\r")
    with pytest.raises(InvalidArgument) as excinfo:
        parse_raw(data)
    assert excinfo.value.reason == "MESSAGE_REJECTED"


@pytest.mark.parametrize("ending", ["\r\n", "\n"])
def test_crlf_and_lf_raw_messages_go_out_without_bcc(ending: str) -> None:
    text = ending.join(
        ["From: a@example.test", "To: b@example.test", "Bcc: spy@example.test", "Subject: x", "", "b"]
    )
    data = _raw(text + ending)
    raw = parse_raw(data)
    assert [m.address for m in raw.bcc] == ["spy@example.test"]
    final = finalize_raw(data, message_id="<id@example.test>", date=NOW)
    check_wire_message(final, bcc=["spy@example.test"])


@pytest.mark.parametrize(
    "header",
    [
        "Subject: =?utf-8?q?a=0D=0ABcc:_x@example.test?=",
        "Subject: =?utf-8?b?DQpCY2M6IHhAZXhhbXBsZS50ZXN0?=",
        "From: =?utf-8?q?a=0D=0Ab?= <a@example.test>",
        "Subject: =?utf-8?q?a=00b?=",
    ],
)
def test_encoded_words_that_decode_to_line_breaks_or_controls_are_refused(header: str) -> None:
    lines = ["To: b@example.test", header]
    if not header.startswith("From"):
        lines.insert(0, "From: a@example.test")
    with pytest.raises(InvalidArgument):
        parse_raw(_raw("\r\n".join(lines) + "\r\n\r\nbody\r\n"))


@pytest.mark.parametrize(
    "data",
    [
        b"From: a@example.test\r\nTo: b@example.test\r\nSubject: caf\xc3\xa9\r\n\r\nbody\r\n",
        b"From: a@example.test\r\nTo: b@example.test\r\nSubject: a\x00b\r\n\r\nbody\r\n",
        b"From: a@example.test\r\nTo: b@example.test\r\nX-Long: " + b"y" * 1000 + b"\r\n\r\nbody\r\n",
        b"From: a@example.test\r\nTo: b@example.test\r\n\r\n" + b"z" * 1000 + b"\r\n",
        b"From: a@example.test\r\nTo: b@example.test\r\nnot a header line\r\n\r\nbody\r\n",
    ],
    ids=["8-bit header", "NUL", "long header line", "long body line", "broken header block"],
)
def test_raw_messages_that_are_not_standard_mail_are_refused(data: bytes) -> None:
    with pytest.raises(InvalidArgument):
        parse_raw(data)


def _nested(depth: int) -> bytes:
    opening = "".join(
        f'Content-Type: multipart/mixed; boundary="d{i}"\r\n\r\n--d{i}\r\n' for i in range(depth)
    )
    closing = "".join(f"\r\n--d{i}--\r\n" for i in reversed(range(depth)))
    return _raw(
        "From: a@example.test\r\nTo: b@example.test\r\n"
        + opening
        + "Content-Type: text/plain\r\n\r\nx"
        + closing
    )


@pytest.mark.parametrize("depth", [MAX_MIME_DEPTH + 1, 1000, 5000])
def test_multiparts_nested_too_deep_are_refused(depth: int) -> None:
    with pytest.raises(InvalidArgument) as excinfo:
        parse_raw(_nested(depth))
    assert "nested" in excinfo.value.message


def test_multiparts_nested_a_little_are_accepted() -> None:
    assert parse_raw(_nested(10)).sender.address == "a@example.test"


def test_a_raw_sender_header_must_be_allowed_too() -> None:
    data = _raw("From: a@example.test\r\nSender: other@elsewhere.test\r\nTo: b@example.test\r\n\r\nbody\r\n")
    raw = parse_raw(data)
    assert raw.sender_header is not None and raw.sender_header.address == "other@elsewhere.test"


# --- Templates


def test_template_data_nested_too_deep_is_refused_not_a_crash() -> None:
    for depth in (rendering.MAX_DATA_DEPTH + 1, 1000, 100_000):
        with pytest.raises(ValueError, match="nested"):
            rendering.parse_data('{"a": ' + "[" * depth + "]" * depth + "}")


def test_templates_nested_too_deep_are_a_syntax_error() -> None:
    depth = rendering.MAX_BLOCK_DEPTH + 1
    with pytest.raises(rendering.TemplateSyntaxError, match="nested"):
        rendering.parse("{{#if a}}" * depth + "x" + "{{/if}}" * depth)
    with pytest.raises(rendering.TemplateSyntaxError):
        rendering.parse("{{#each a}}" * 1000 + "{{/each}}" * 1000)


def test_an_expanding_template_stops_at_its_output_budget() -> None:
    # The 81-byte template of the issue, which once rendered 13 million characters.
    template = rendering.parse(
        "{{#each a}}{{#each a}}{{#each a}}{{#each a}}{{a}}{{/each}}{{/each}}{{/each}}{{/each}}"
    )
    data = {"a": list(range(60))}
    with pytest.raises(rendering.RenderError, match="longer than"):
        template.render(data, escape_html=False)


def test_a_slow_template_stops_at_its_time_budget() -> None:
    template = rendering.parse(
        "{{#each a}}{{#each a}}{{#each a}}{{#each a}}{{/each}}{{/each}}{{/each}}{{/each}}"
    )
    started = time.monotonic()
    with pytest.raises(rendering.RenderError, match="took longer"):
        template.render({"a": list(range(200))}, escape_html=False, seconds=0.2)
    assert time.monotonic() - started < 30  # ends (generous: a shared machine), rather than running on


@pytest.mark.parametrize(
    "value", ["=?utf-8?q?a=0D=0ABcc:_x@example.test?=", "x =?utf-8?b?DQpCY2M6IHg=?= y", "=?utf-8?q?a=00?="]
)
def test_encoded_words_given_as_text_that_decode_to_controls_are_refused(value: str) -> None:
    with pytest.raises(InvalidArgument):
        _build(Body(value, "text", ""))
    with pytest.raises(InvalidArgument):
        _build(Body("s", "text", "", headers=[Header("X-Custom", value)]))


def test_ordinary_encoded_words_are_kept() -> None:
    data = _build(Body("=?utf-8?q?caf=C3=A9?=", "text", ""))
    assert b"Subject: =?utf-8?q?caf=C3=A9?=" in data


async def test_rendering_runs_off_the_event_loop() -> None:
    """A template that uses its whole time budget leaves the event loop free meanwhile (other
    accounts' calls, health checks)."""
    acceptor = Acceptor(
        js=None,  # type: ignore[arg-type]  # rendering needs none of these
        events=None,  # type: ignore[arg-type]
        checks=None,  # type: ignore[arg-type]
        templates=None,  # type: ignore[arg-type]
        keys=None,  # type: ignore[arg-type]
        clock=SystemClock(),
    )
    loops = "{{#each a}}{{#each a}}{{#each a}}{{#each a}}{{/each}}{{/each}}{{/each}}{{/each}}"
    ticks = 0

    async def tick() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await asyncio.sleep(0.01)

    ticker = asyncio.create_task(tick())
    try:
        with pytest.raises(RenderFailure, match="took longer"):
            await acceptor._render("slow", ("s", loops, ""), {"a": list(range(400))})
    finally:
        ticker.cancel()
        acceptor.close()
    assert ticks > 2


def test_unknown_enum_numbers_are_refused_at_any_depth_naming_the_field() -> None:
    request = cs.CreateConfigurationSetEventDestinationRequest(configuration_set_name="set")
    request.event_destination.webhook.url = "https://127.0.0.1/hook"
    assert _unknown_enum_value(request) is None
    request.event_destination.webhook.format = 77  # type: ignore[assignment]
    refused = _unknown_enum_value(request)
    assert refused is not None and refused.field == "event_destination.webhook.format"
    request.event_destination.webhook.format = cs.WEBHOOK_FORMAT_JSON
    request.event_destination.matching_event_types.extend([1, 4000])  # type: ignore[list-item]
    refused = _unknown_enum_value(request)
    assert refused is not None and refused.field == "event_destination.matching_event_types"
    # Parts that cannot hold an enum are not walked; parts that can, are.
    assert not _may_hold_enums(sender_pb2.Destination.DESCRIPTOR)
    assert _may_hold_enums(cs.EventDestinationDefinition.DESCRIPTOR)
