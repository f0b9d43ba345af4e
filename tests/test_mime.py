"""Building the final MIME and checking raw MIME: headers, encodings, Bcc, attachments."""

from __future__ import annotations

import datetime as dt
from email import message_from_bytes, policy
from email.message import EmailMessage

import pytest

from postmesh.common.errors import InvalidArgument
from services.sender.mime import (
    REFUSED_EXTENSIONS,
    Addressing,
    Body,
    Header,
    build_message,
    check_custom_headers,
    finalize_raw,
    message_id_header,
    new_message_id,
    parse_mailbox,
    parse_raw,
)

NOW = dt.datetime(2026, 11, 28, 12, 0, tzinfo=dt.UTC)


def _parse(data: bytes) -> EmailMessage:
    message = message_from_bytes(data, policy=policy.default)
    assert isinstance(message, EmailMessage)
    return message


def test_simple_message_headers_and_parts() -> None:
    addressing = Addressing(
        parse_mailbox("Zoë Ünïcode <zoe@bücher.example.test>", field="from"),
        to=[parse_mailbox("to@example.test", field="to")],
        cc=[parse_mailbox("Cc Person <cc@example.test>", field="cc")],
        reply_to=[parse_mailbox("reply@example.test", field="reply_to")],
    )
    body = Body("Grüße €", "héllo\nworld", "<p>hé</p>", headers=[Header("X-Campaign", "winter")])
    data = build_message(addressing, body, message_id="<id-1@mail.example.test>", date=NOW)
    assert b"\r\n" in data and b"\n" not in data.replace(b"\r\n", b"")
    assert all(byte < 128 for byte in data), "the message must be 7-bit clean"
    message = _parse(data)
    assert message["From"].addresses[0].display_name == "Zoë Ünïcode"
    assert message["From"].addresses[0].addr_spec == "zoe@xn--bcher-kva.example.test"
    assert b"=?utf-8?" in data.split(b"\r\n\r\n")[0]  # RFC 2047 words for the subject and name
    assert str(message["Subject"]) == "Grüße €"
    assert message["Message-ID"] == "<id-1@mail.example.test>"
    assert message["MIME-Version"] == "1.0"
    assert message["Date"].datetime == NOW
    assert message["Reply-To"] == "reply@example.test"
    assert message["X-Campaign"] == "winter"
    assert "Bcc" not in message
    assert message.get_content_type() == "multipart/alternative"
    text, html = message.iter_parts()
    assert text.get_content_type() == "text/plain" and "héllo" in text.get_content()
    assert html.get_content_type() == "text/html" and html.get_content().strip() == "<p>hé</p>"
    assert data.count(b"MIME-Version") == 1


def test_single_part_and_charset() -> None:
    sender = parse_mailbox("a@example.test", field="f")
    data = build_message(Addressing(sender), Body("S", "", "<b>x</b>"), message_id="<m@x.test>", date=NOW)
    assert _parse(data).get_content_type() == "text/html"
    latin = build_message(
        Addressing(sender), Body("S", "café", "", charset="ISO-8859-1"), message_id="<m@x.test>", date=NOW
    )
    part = _parse(latin)
    assert part.get_content_charset() == "iso-8859-1" and part.get_content().strip() == "café"
    with pytest.raises(InvalidArgument) as excinfo:
        build_message(Addressing(sender), Body("S", "x", "", charset="no-such"), message_id=None, date=NOW)
    assert excinfo.value.field == "charset"
    with pytest.raises(InvalidArgument):
        build_message(Addressing(sender), Body("S", "€", "", charset="ascii"), message_id=None, date=NOW)


@pytest.mark.parametrize(
    "value",
    [
        "a@example.test\r\nBcc: victim@example.test",
        "Name\n <a@example.test>",
        "not an address",
        "a@b@example.test",
        "a@-bad-.test",
        "",
    ],
)
def test_bad_mailboxes_are_refused(value: str) -> None:
    with pytest.raises(InvalidArgument) as excinfo:
        parse_mailbox(value, field="destination.to_addresses[0]")
    assert excinfo.value.field == "destination.to_addresses[0]"


def test_subject_and_custom_header_injection_is_refused() -> None:
    sender = parse_mailbox("a@example.test", field="f")
    with pytest.raises(InvalidArgument) as excinfo:
        build_message(Addressing(sender), Body("Hi\r\nBcc: x@y.test", "t", ""), message_id=None, date=NOW)
    assert excinfo.value.field == "subject"
    for headers in (
        [Header("X-Ok", "a\nb")],
        [Header("Bad Name", "v")],
        [Header("Bad:Name", "v")],
        [Header("Bcc", "x@example.test")],
        [Header("message-id", "<x@y>")],
    ):
        with pytest.raises(InvalidArgument):
            check_custom_headers(headers, field="content.simple.headers")


def test_message_ids_are_unique_and_time_ordered() -> None:
    ids = [new_message_id(NOW + dt.timedelta(milliseconds=i)) for i in range(200)]
    assert len(set(ids)) == 200
    assert ids == sorted(ids)
    assert ids[0].endswith("-000000") and len(ids[0]) == 60
    header = message_id_header(ids[0], "mail.example.test")
    assert header == f"<{ids[0]}@mail.example.test>"
    # Longer than 78 columns, and still on one line (not folded into an empty line and the id).
    sender = parse_mailbox("a@example.test", field="f")
    data = build_message(Addressing(sender), Body("S", "t", ""), message_id=header, date=NOW)
    assert f"\r\nMessage-ID: {header}\r\n".encode() in data
    assert max(len(line) for line in data.split(b"\r\n")) <= 998


RAW = (
    b"From: Sender Name <sender@example.test>\n"
    b"To: a@example.test, B <b@example.test>\n"
    b"Cc: c@example.test\n"
    b"Bcc: hidden@example.test\n"
    b"Message-ID: <theirs@example.test>\n"
    b"X-SES-CONFIGURATION-SET: marketing\n"
    b"X-SES-MESSAGE-TAGS: campaign=winter, kind=promo\n"
    b"Subject: raw\n"
    b" continued\n"
    b"\n"
    b"line one\n"
    b"line two\n"
)


def test_raw_message_is_read_and_finalized() -> None:
    raw = parse_raw(RAW)
    assert raw.sender.address == "sender@example.test" and raw.sender.display_name == "Sender Name"
    assert [m.address for m in raw.to] == ["a@example.test", "b@example.test"]
    assert [m.address for m in raw.cc] == ["c@example.test"]
    assert [m.address for m in raw.bcc] == ["hidden@example.test"]
    assert raw.configuration_set == "marketing"
    assert raw.tags == [("campaign", "winter"), ("kind", "promo")]
    final = finalize_raw(RAW, message_id="<ours@mail.example.test>", date=NOW)
    message = _parse(final)
    assert "Bcc" not in message and b"hidden@example.test" not in final
    assert message.get_all("Message-ID") == ["<ours@mail.example.test>"]
    assert "X-SES-CONFIGURATION-SET" not in message and "X-SES-MESSAGE-TAGS" not in message
    assert message["Date"] and message["MIME-Version"] == "1.0"
    assert str(message["Subject"]) == "raw continued"
    assert final.endswith(b"\r\n\r\nline one\r\nline two\r\n")


def _with_attachment(filename: str) -> bytes:
    message = EmailMessage()
    message["From"] = "a@example.test"
    message["To"] = "b@example.test"
    message["Subject"] = "files"
    message.set_content("see attached")
    message.add_attachment(b"MZ\x90\x00", maintype="application", subtype="octet-stream", filename=filename)
    return message.as_bytes()


@pytest.mark.parametrize("filename", ["setup.exe", "RUN.BAT", "x.tar.js", "macro.vbs", "a.scr", "p.ps1"])
def test_refused_attachment_types(filename: str) -> None:
    with pytest.raises(InvalidArgument) as excinfo:
        parse_raw(_with_attachment(filename))
    assert excinfo.value.reason == "MESSAGE_REJECTED"


def test_allowed_attachment_types_and_the_whole_ses_list() -> None:
    for filename in ("report.pdf", "photo.jpeg", "data.csv", "archive.zip", "exe"):
        parse_raw(_with_attachment(filename))
    assert len(REFUSED_EXTENSIONS) == 90 and {"exe", "vsmacros", "msh2xml", "xnk"} <= REFUSED_EXTENSIONS


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"just some text without headers\n",
        b"\nbody only\n",
        b"To: b@example.test\nSubject: no from\n\nbody\n",
        b"From: a@example.test, b@example.test\nTo: c@example.test\n\nbody\n",
        b'From: a@example.test\nContent-Type: multipart/mixed; boundary="zz"\n\nno boundary here\n',
        b"From: a@example.test\nContent-Type: multipart/mixed\n\n--x\n\nbody\n--x--\n",
    ],
)
def test_unparseable_raw_messages_are_invalid(data: bytes) -> None:
    with pytest.raises(InvalidArgument) as excinfo:
        parse_raw(data)
    assert excinfo.value.field == "content.raw.data"
