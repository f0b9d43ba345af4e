"""The top-level headers of a message as SES's mail object carries them: name/value pairs in the
order they appear, values unfolded, cut off (and flagged) past SES's 10 KB.

The fields are what the email package's compat32 parser reads (`BytesHeaderParser`). Its feed
parser was 2% of the CPU of a busy mesh, so a header block of `Name: value` lines and folded
continuations, with one line ending throughout (CRLF, or LF), is taken apart directly; anything
else (a bare CR, mixed line endings, a line that is neither a field nor a continuation, an empty or
odd field name, a 'From ' line, a first line that is a continuation) is left to the email package."""

from __future__ import annotations

import re
from email import policy
from email.parser import BytesHeaderParser

from postmesh.events.v1 import events_pb2

MAX_HEADER_BYTES = 10 * 1024

# A field name as the feed parser's headerRE takes it: printable ASCII but ':' (nothing if empty).
_FIELD_NAMES = re.compile(r"[\x21-\x39\x3b-\x7e]*")
# Where a field ends: a line ending not followed by a continuation line (one starting with white space).
_FIELD_ENDS = {b"\r\n": re.compile(r"\r\n(?![ \t])"), b"\n": re.compile(r"\n(?![ \t])")}


def top_headers(mime: bytes, limit: int = MAX_HEADER_BYTES) -> tuple[list[events_pb2.Header], bool]:
    """(headers, truncated) of a MIME message."""
    fields = direct_fields(mime)
    if fields is None:
        fields = email_package_fields(mime)
    headers: list[events_pb2.Header] = []
    used = 0
    for name, text in fields:
        used += len(name) + len(text.encode("utf-8", "replace")) + 4
        if used > limit:
            return headers, True
        headers.append(events_pb2.Header(name=name, value=text))
    return headers, False


def email_package_fields(mime: bytes) -> list[tuple[str, str]]:
    """(name, unfolded value) of each top-level field, as the email package's compat32 reads them."""
    message = BytesHeaderParser(policy=policy.compat32).parsebytes(mime)
    return [
        (name, str(value).replace("\r\n", "\n").replace("\n", "").strip())
        for name, value in message.raw_items()
    ]


def direct_fields(mime: bytes) -> list[tuple[str, str]] | None:
    """`email_package_fields(mime)` for a header block of fields and continuation lines with one line
    ending throughout; None for anything else."""
    if not mime or mime[:1] in (b"\r", b"\n"):
        return []  # nothing, or an empty first line: the body starts at once
    newline = mime.find(b"\n")
    eol = b"\r\n" if newline > 0 and mime[newline - 1] == 0x0D else b"\n"
    end = mime.find(eol + eol)
    if end >= 0:
        head = mime[:end]
    else:  # no body: every line is a header line, the last one perhaps unterminated
        head = mime[: -len(eol)] if mime.endswith(eol) else mime
    # Only that line ending in the header block: the feed parser also breaks lines at a lone CR or LF.
    if eol == b"\n":
        if b"\r" in head:
            return None
    else:
        crlf = head.count(b"\r\n")
        if head.count(b"\r") != crlf or head.count(b"\n") != crlf:
            return None
    # The email package's text: 8-bit bytes as surrogates.
    text = head.decode("ascii", "surrogateescape")
    fold = "\r\n" if eol == b"\r\n" else "\n"
    fields: list[tuple[str, str]] = []
    for field in _FIELD_ENDS[eol].split(text):  # no line is empty: the first empty one ended the block
        name, colon, value = field.partition(":")
        if not name or not colon:
            return None  # a line that is not a field (the body starts there), or no name (a defect)
        # compat32's value is the first line's rest and the continuation lines, line endings kept;
        # unfolded and stripped as email_package_fields does (no other CR or LF is left in it).
        fields.append((name, value.replace(fold, "").strip()))
    # One pass over all the names: a 'From ' line (an envelope line to the parser), a continuation line
    # first (a defect), white space before the colon, or a colon only in a continuation line fails it.
    if not _FIELD_NAMES.fullmatch("".join([name for name, _ in fields])):
        return None
    return fields
