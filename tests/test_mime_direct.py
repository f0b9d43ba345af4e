"""The direct MIME builder against the email package's: the same header block byte for byte (the
multipart boundary taken from the email package's message), the same structure and the same bodies
once parsed and decoded by the email package, CRLF everywhere and no line over 998 characters; and
other charsets still built by the email package."""

from __future__ import annotations

import codecs
import datetime as dt
import re
from email import message_from_bytes, policy

import pytest
from hypothesis import given
from hypothesis import strategies as st

from postmesh.common.errors import InvalidArgument
from postmesh.common.mailformat import _LONG_LINE, check_wire, too_long_line
from services.sender.mime import (
    Addressing,
    Body,
    Header,
    Mailbox,
    _body_charset,
    _direct_message,
    _email_package_message,
    build_message,
)
from tests.fuzz_helpers import fuzz_settings

NOW = dt.datetime(2026, 11, 28, 12, 0, tzinfo=dt.UTC)


def _old(addressing: Addressing | None, body: Body, message_id: str | None) -> bytes:
    return _email_package_message(
        addressing, body, _body_charset(body.charset), message_id=message_id, date=NOW
    )


def _new(
    addressing: Addressing | None, body: Body, message_id: str | None, boundary: str | None
) -> bytes | None:
    return _direct_message(
        addressing, body, _body_charset(body.charset), message_id=message_id, date=NOW, boundary=boundary
    )


def _leaves(data: bytes) -> list[tuple[list[tuple[str, str]], bytes]]:
    """Each leaf part's header fields (decoded, unfolded) and decoded body, read by the email package."""
    message = message_from_bytes(data, policy=policy.default)
    leaves = []
    for part in message.walk():
        if part.is_multipart():
            continue
        payload = part.get_payload(decode=True)
        assert isinstance(payload, bytes)
        leaves.append(([(name, str(value)) for name, value in part.items()], payload))
    assert not any(part.defects for part in message.walk())
    return leaves


def _headers(data: bytes) -> list[tuple[str, str]]:
    message = message_from_bytes(data, policy=policy.default)
    return [(name, str(value)) for name, value in message.items()]


def _check_same(
    addressing: Addressing | None, body: Body, message_id: str | None = "<m@example.test>"
) -> bytes:
    """The direct message, checked against the email package's."""
    try:
        old = _old(addressing, body, message_id)
    except InvalidArgument as error:
        with pytest.raises(InvalidArgument) as raised:
            _new(addressing, body, message_id, None) or _old(addressing, body, message_id)
        assert raised.value.message == error.message
        return b""
    found = re.search(rb'boundary="([^"]+)"', old)
    new = _new(addressing, body, message_id, found.group(1).decode() if found else None)
    assert new is not None
    old_head, _, _ = old.partition(b"\r\n\r\n")
    new_head, _, _ = new.partition(b"\r\n\r\n")
    assert new_head == old_head
    assert _headers(new) == _headers(old)
    assert _leaves(new) == _leaves(old)
    assert b"\n" not in new.replace(b"\r\n", b"") and b"\r" not in new.replace(b"\r\n", b"")
    assert new.isascii() and b"\x00" not in new
    if too_long_line(old) is None:
        check_wire(new, field="content")
    else:  # a header the email package cannot fold (both refused)
        assert too_long_line(new) is not None
    return new


SENDER = Mailbox("Zoë Sender", "news@example.test")
TO = [Mailbox("", "to@example.test")]


@pytest.mark.parametrize(
    "body",
    [
        Body("Hello", "plain text\nsecond line\n", ""),
        Body("Hello", "", "<p>html only</p>"),
        Body("Grüße €", "héllo\r\nworld\rmore\n\n\n", "<p>hé</p>"),
        Body("x" * 200, "trailing space \nand tab\t\n. \n.\nFrom here\n=3D\n" + "y" * 300, "z" * 2000),
        Body("S", "no final line break", "   "),
        Body("S", "\n", "\r\n\r\n"),
        Body("S", "😀 日本語 \x85 \u2028 \x0b\x0c\x1c", "Å \u0445 Ņ"),
        Body(
            "Hello", "t", "h", charset="utf8", headers=[Header("X-Campaign", "winter"), Header("X-Empty", "")]
        ),
    ],
)
def test_fixed_messages_match_the_email_package(body: Body) -> None:
    many = [Mailbox(f"Person {i}", f"p{i}@example.test") for i in range(20)]
    addressing = Addressing(SENDER, TO, many[:2], many[2:3])
    new = _check_same(addressing, body)
    if not (body.text and body.html):  # no random boundary: build_message writes these very bytes
        assert new == build_message(addressing, body, message_id="<m@example.test>", date=NOW)
    _check_same(Addressing(SENDER, many), body)
    _check_same(None, body, message_id=None)


def test_other_charsets_and_unencodable_bodies_go_to_the_email_package() -> None:
    assert _new(Addressing(SENDER, TO), Body("S", "é", "", charset="iso-8859-1"), None, None) is None
    assert _new(Addressing(SENDER, TO), Body("S", "\ud800", ""), None, None) is None
    latin = build_message(
        Addressing(SENDER, TO), Body("S", "é", "", charset="latin-1"), message_id=None, date=NOW
    )
    assert b'charset="iso-8859-1"' in latin and _leaves(latin)[0][1] == "é".encode("latin-1")
    with pytest.raises(InvalidArgument, match="charset"):
        build_message(Addressing(SENDER, TO), Body("S", "\ud800", ""), message_id=None, date=NOW)


def test_build_message_writes_utf8_directly() -> None:
    data = build_message(
        Addressing(SENDER, TO), Body("S", "text", "<p>html</p>"), message_id="<m@x.test>", date=NOW
    )
    boundary = re.search(rb'boundary="([^"]+)"', data)
    assert boundary is not None
    assert data.endswith(b"\r\n--" + boundary.group(1) + b"--\r\n")
    assert data == _new(
        Addressing(SENDER, TO), Body("S", "text", "<p>html</p>"), "<m@x.test>", boundary.group(1).decode()
    )


# --- Generated messages

_TEXT_PIECES = st.one_of(
    st.text(max_size=30),
    st.text(st.sampled_from(list("ab .=-\t é日😀\r\n")), max_size=60),
    st.sampled_from(
        ["\r\n", "\n", "\r", " \n", "\t\r\n", ".\n", "From x\n", "=", "=\n", "x" * 80, "y " * 60, "é" * 40]
    ),
)
_TEXTS = st.lists(_TEXT_PIECES, max_size=12).map("".join)
_HEADER_TEXT = st.one_of(
    st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=90),
    st.text(st.sampled_from(list("ab ,;:<>\"'()=?é日\t")), max_size=60),
    st.sampled_from(["", " ", "a ", " a", "a  ", "x" * 75, "word " * 30, "=?utf-8?q?x?=", "w" * 950]),
)
_CHARSETS = st.sampled_from(["UTF-8", "utf-8", "utf8", "UTF8", "us-ascii", "iso-8859-1", "windows-1252"])
_MAILBOXES = st.builds(
    Mailbox,
    st.one_of(st.just(""), _HEADER_TEXT.filter(lambda t: not any(c in t for c in '"<>'))),
    st.sampled_from(["a@example.test", "first.last+tag@sub.example.test", "x@xn--bcher-kva.example.test"]),
)


@given(
    subject=_HEADER_TEXT,
    text=_TEXTS,
    html=_TEXTS,
    charset=_CHARSETS,
    sender=_MAILBOXES,
    to=st.lists(_MAILBOXES, max_size=6),
    cc=st.lists(_MAILBOXES, max_size=3),
    headers=st.lists(
        st.builds(Header, st.sampled_from(["X-Campaign", "X-A", "List-Id"]), _HEADER_TEXT), max_size=3
    ),
)
@fuzz_settings(examples=300)
def test_generated_messages_match_the_email_package(
    subject: str,
    text: str,
    html: str,
    charset: str,
    sender: Mailbox,
    to: list[Mailbox],
    cc: list[Mailbox],
    headers: list[Header],
) -> None:
    body = Body(subject, text, html, charset=charset, headers=headers)
    if not (text or html):
        return
    if codecs.lookup(charset).name != "utf-8":
        assert _new(Addressing(sender, to, cc), body, None, None) is None
        return
    _check_same(Addressing(sender, to, cc), body)


@given(
    st.lists(
        st.one_of(
            st.sampled_from([b"\r\n", b"\n", b"\r", b"\r\r\n", b"x" * 500, b"y" * 998, b"z" * 999]),
            st.binary(max_size=40),
        ),
        max_size=12,
    ).map(b"".join)
)
@fuzz_settings(examples=300)
def test_the_line_length_check_finds_what_the_regex_found(data: bytes) -> None:
    match = _LONG_LINE.search(data)
    assert too_long_line(data) == (None if match is None else data.count(b"\n", 0, match.start()) + 1)
