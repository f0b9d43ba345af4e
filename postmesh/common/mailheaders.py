"""The top-level headers of a message as SES's mail object carries them: name/value pairs in the
order they appear, values unfolded, cut off (and flagged) past SES's 10 KB."""

from __future__ import annotations

from email import policy
from email.parser import BytesHeaderParser

from postmesh.events.v1 import events_pb2

MAX_HEADER_BYTES = 10 * 1024


def top_headers(mime: bytes, limit: int = MAX_HEADER_BYTES) -> tuple[list[events_pb2.Header], bool]:
    """(headers, truncated) of a MIME message."""
    message = BytesHeaderParser(policy=policy.compat32).parsebytes(mime)
    headers: list[events_pb2.Header] = []
    used = 0
    for name, value in message.raw_items():
        text = str(value).replace("\r\n", "\n").replace("\n", "").strip()
        used += len(name) + len(text.encode("utf-8", "replace")) + 4
        if used > limit:
            return headers, True
        headers.append(events_pb2.Header(name=name, value=text))
    return headers, False
