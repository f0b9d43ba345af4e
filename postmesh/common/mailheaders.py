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
_FIELD_NAMES = re.compile(rb"[\x21-\x39\x3b-\x7e]*")


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
    fields: list[tuple[bytes, list[bytes]]] = []
    for line in head.split(eol):  # no line is empty: the first empty one ended the header block
        if line[:1] in (b" ", b"\t"):
            if not fields:
                return None  # the feed parser drops it as a defect
            fields[-1][1].append(line)
            continue
        colon = line.find(b":")
        if colon <= 0:
            return None  # not a field (the body starts there) or no name (a defect)
        fields.append((line[:colon], [line[colon + 1 :]]))
    # One pass over all the names: a 'From ' line (an envelope line to the parser) fails it too.
    if not _FIELD_NAMES.fullmatch(b"".join(name for name, _ in fields)):
        return None
    # compat32's value: the first line's rest and the continuation lines, line endings kept; unfolded
    # and stripped as email_package_fields does (no CR or LF is left inside a line here).
    return [
        (name.decode("ascii"), b"".join(parts).decode("ascii", "surrogateescape").strip())
        for name, parts in fields
    ]
