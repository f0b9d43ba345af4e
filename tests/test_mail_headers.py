"""Mail.headers as SES's mail object has them: the top-level headers in order, values unfolded,
flagged as truncated past 10 KB."""

from __future__ import annotations

from collections.abc import Callable
from email import policy
from email.parser import BytesHeaderParser

import pytest
from hypothesis import given
from hypothesis import strategies as st

from postmesh.common.mailheaders import MAX_HEADER_BYTES, direct_fields, email_package_fields, top_headers
from postmesh.events.v1 import events_pb2
from tests.fuzz_helpers import fuzz_settings

MESSAGE = (
    b"From: Sender <news@example.test>\r\nTo: a@example.test,\r\n b@example.test\r\nSubject: Hello\r\n"
    b'MIME-Version: 1.0\r\nContent-Type: multipart/alternative; boundary="x"\r\n\r\n'
    b"--x\r\nContent-Type: text/plain\r\nX-Inner: not top-level\r\n\r\nHi\r\n--x--\r\n"
)


def test_top_level_headers_in_order_and_unfolded() -> None:
    headers, truncated = top_headers(MESSAGE)
    assert [(h.name, h.value) for h in headers] == [
        ("From", "Sender <news@example.test>"),
        ("To", "a@example.test, b@example.test"),
        ("Subject", "Hello"),
        ("MIME-Version", "1.0"),
        ("Content-Type", 'multipart/alternative; boundary="x"'),
    ]
    assert not truncated


def test_headers_past_ses_limit_are_cut_and_flagged() -> None:
    many = b"".join(b"X-Tag-%d: %s\r\n" % (n, b"v" * 200) for n in range(100))
    headers, truncated = top_headers(b"Subject: big\r\n" + many + b"\r\nbody\r\n")
    assert truncated and headers[0].name == "Subject"
    assert sum(len(h.name) + len(h.value) + 4 for h in headers) <= MAX_HEADER_BYTES


# --- The direct reading of the header block gives the email package's fields, or leaves it to it.


def _email_package_top_headers(mime: bytes) -> tuple[list[tuple[str, str]], bool]:
    """top_headers as it was, the email package's compat32 parser alone."""
    message = BytesHeaderParser(policy=policy.compat32).parsebytes(mime)
    headers: list[tuple[str, str]] = []
    used = 0
    for name, value in message.raw_items():
        text = str(value).replace("\r\n", "\n").replace("\n", "").strip()
        used += len(name) + len(text.encode("utf-8", "replace")) + 4
        if used > MAX_HEADER_BYTES:
            return headers, True
        header = events_pb2.Header(name=name, value=text)
        headers.append((header.name, header.value))
    return headers, False


def _outcome(read: Callable[[], tuple[list[tuple[str, str]], bool]]) -> object:
    """What a reading gives, or the type of what it raises (8-bit text is surrogates to protobuf)."""
    try:
        return read()
    except Exception as exc:
        return type(exc)


_EOLS = st.sampled_from([b"\r\n", b"\n"])
_ODD_EOLS = st.sampled_from([b"\r\n", b"\n", b"\r", b"", b"\r\r\n", b"\n\r"])
_NAME = st.one_of(
    st.sampled_from([b"Subject", b"From", b"To", b"X-Tag", b"Content-Type", b"Received", b"DKIM-Signature"]),
    st.binary(min_size=1, max_size=12).map(lambda b: bytes(c % 94 + 33 for c in b).replace(b":", b"-")),
)
_ODD_NAME = st.one_of(
    _NAME,
    st.sampled_from([b"", b"From ", b"From", b"X Tag", b"X-Tag ", b"X-Tag\t", b"\xc3\xa9t\xc3\xa9", b"\x7f"]),
    st.binary(max_size=10),
)
_TEXT = st.one_of(
    st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=60).map(str.encode),
    st.sampled_from([b"", b" ", b"\t", b"  a  ", b"=?utf-8?q?caf=C3=A9?=", b"a:b", b"x" * 9000, b"\x1c\x1f"]),
)
_ODD_TEXT = st.one_of(
    _TEXT,
    st.binary(max_size=40),
    st.text(max_size=20).map(lambda t: t.encode("utf-8")),
    st.sampled_from([b"\r", b"\n", b"\x0b", b"\x0c", b"\xff\xfe", b"caf\xc3\xa9", b"\x00"]),
)


@st.composite
def _blocks(draw: st.DrawFn, hostile: bool) -> bytes:
    """A header block (fields, continuations, perhaps 'From ' lines and odd names or line endings),
    perhaps a separator and a body."""
    name, text, eols = (_ODD_NAME, _ODD_TEXT, _ODD_EOLS) if hostile else (_NAME, _TEXT, _EOLS)
    eol = draw(_EOLS)
    lines: list[bytes] = []
    for _ in range(draw(st.integers(0, 12))):
        kind = draw(st.integers(0, 9)) if hostile else draw(st.integers(0, 5))
        if kind <= 3 or not lines:
            separator = draw(st.sampled_from([b":", b": ", b":\t", b" :", b"::"])) if hostile else b": "
            line = draw(name) + separator + draw(text)
        elif kind <= 5:
            line = draw(st.sampled_from([b" ", b"\t", b"  "])) + draw(text)
        elif kind == 6:
            line = b"From " + draw(text)
        elif kind == 7:
            line = draw(text)  # no colon, or not a field at all
        else:
            line = b""  # an early separator
        lines.append(line + (draw(eols) if hostile and draw(st.booleans()) else eol))
    block = b"".join(lines)
    if draw(st.booleans()):
        block += eol + draw(st.binary(max_size=40))
    elif block and draw(st.booleans()):
        block = block.removesuffix(eol)  # no separator, the last line unterminated
    return block


def _assert_same(mime: bytes) -> list[tuple[str, str]] | None:
    direct = direct_fields(mime)
    if direct is not None:
        assert direct == email_package_fields(mime), mime

    def read() -> tuple[list[tuple[str, str]], bool]:
        headers, truncated = top_headers(mime)
        return [(h.name, h.value) for h in headers], truncated

    assert _outcome(read) == _outcome(lambda: _email_package_top_headers(mime)), mime
    return direct


@given(mime=_blocks(hostile=False))
@fuzz_settings(examples=300)
def test_plain_header_blocks_are_read_directly_as_the_email_package_reads_them(mime: bytes) -> None:
    assert _assert_same(mime) is not None, mime


@given(mime=st.one_of(_blocks(hostile=True), st.binary(max_size=200)))
@fuzz_settings(examples=600)
def test_hostile_header_blocks_read_as_the_email_package_reads_them(mime: bytes) -> None:
    _assert_same(mime)


@pytest.mark.parametrize(
    "mime",
    [
        b"",
        b"\r\n",
        b"\rSubject: x\r\n",
        b"Subject: a\rX: b\r\n\r\n",  # a lone CR ends a line for the parser
        b"Subject: a\nX: b\r\n\r\n",  # mixed line endings
        b" folded: first\r\nSubject: a\r\n\r\n",
        b"From someone Tue Dec 1\r\nSubject: a\r\n\r\n",
        b"Subject: a\r\nFrom someone\r\nX: b\r\n\r\n",
        b"Subject: a\r\nnot a field\r\nX: b\r\n\r\n",
        b": no name\r\nSubject: a\r\n\r\n",
        b"Subject : spaced\r\n\r\n",
        b"Subject: caf\xc3\xa9\r\n\r\n",
        b"Subject: a\r\n \r\n\tb \r\n\r\nbody",
        b"Subject: a\r\n\r",
        b"Subject:" + b"x" * 20_000 + b"\r\n\r\n",
        b"Subject: a\r\nX-Sep: b\r\n\r\nbody\r\n\r\n",
        b"Subject: a\nTo: b\n  c\n\nbody",
        b"Subject: no separator\r\nTo: b",
    ],
)
def test_edge_cases_read_as_the_email_package_reads_them(mime: bytes) -> None:
    _assert_same(mime)


def test_the_messages_postmesh_writes_are_read_directly() -> None:
    assert direct_fields(MESSAGE) == email_package_fields(MESSAGE)
