"""Option headers of a message submitted over SMTP, read and then removed before delivery.

SES reads X-SES-CONFIGURATION-SET, X-SES-MESSAGE-TAGS, X-SES-SOURCE-ARN, X-SES-FROM-ARN and
X-SES-RETURN-PATH-ARN from messages sent through its SMTP interface; postmesh also reads the same
names with an X-Postmesh- prefix. None of them leaves postmesh.

The header block is split as bytes, so the rest of the message goes on exactly as received. A line in
the header block that is neither a field ("Name: value") nor a folded continuation is refused: it is
how header injection shows (a stray line break in a value), and mail readers disagree on what it means.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from postmesh.common.errors import InvalidArgument

_OPTIONS = ("configuration-set", "message-tags", "source-arn", "from-arn", "return-path-arn")
_PREFIXES = ("x-ses-", "x-postmesh-")
_FIELD = re.compile(rb"^[\x21-\x39\x3b-\x7e]+[ \t]*:")
_FIELD_NAME = "content.raw.data"


@dataclass
class Options:
    configuration_set: str = ""
    tags: list[tuple[str, str]] = field(default_factory=list)
    # The identity (name or ARN) that covers the sender, under sending authorization.
    identity: str = ""


def _option_name(line: bytes) -> str | None:
    name = line.split(b":", 1)[0].strip().lower().decode("ascii", "replace")
    for prefix in _PREFIXES:
        if name.startswith(prefix) and name[len(prefix) :] in _OPTIONS:
            return name[len(prefix) :]
    return None


def _tags(value: str) -> list[tuple[str, str]]:
    tags = []
    for item in filter(None, (t.strip() for t in value.split(","))):
        name, equals, tag_value = item.partition("=")
        if not equals:
            raise InvalidArgument(f"Message tag {item!r} is not name=value.", field=_FIELD_NAME)
        tags.append((name.strip(), tag_value.strip()))
    return tags


def split_options(data: bytes) -> tuple[Options, bytes]:
    """The options the message's headers select, and the message without those headers."""
    match = re.search(rb"\r?\n\r?\n", data)
    head, separator, body = (
        (data, b"", b"")
        if match is None
        else (
            data[: match.start()],
            data[match.start() : match.end()],
            data[match.end() :],
        )
    )
    fields: list[list[bytes]] = []
    for line in re.split(rb"\r?\n", head):
        if line[:1] in (b" ", b"\t") and fields:
            fields[-1].append(line)
        elif _FIELD.match(line):
            fields.append([line])
        elif line:
            shown = line[:60].decode("utf-8", "replace")
            raise InvalidArgument(
                f"Malformed header line {shown!r}: neither a header field nor a folded continuation.",
                field=_FIELD_NAME,
            )
    options = Options()
    seen: dict[str, str] = {}
    kept: list[list[bytes]] = []
    for lines in fields:
        option = _option_name(lines[0])
        if option is None:
            kept.append(lines)
            continue
        unfolded = b" ".join(part.strip() for part in [lines[0].split(b":", 1)[1], *lines[1:]])
        value = unfolded.decode("utf-8", "replace").strip()
        if option in seen and seen[option] != value:
            raise InvalidArgument(f"The message selects two different {option} options.", field=_FIELD_NAME)
        seen[option] = value
    options.configuration_set = seen.get("configuration-set", "")
    options.tags = _tags(seen.get("message-tags", ""))
    identities = {v for k, v in seen.items() if k.endswith("-arn") and v}
    if len(identities) > 1:
        raise InvalidArgument(
            "X-SES-SOURCE-ARN, X-SES-FROM-ARN and X-SES-RETURN-PATH-ARN name different identities; "
            "postmesh authorizes a message's sender addresses with one identity.",
            field=_FIELD_NAME,
        )
    options.identity = identities.pop() if identities else ""
    if len(kept) == len(fields):
        return options, data
    newline = b"\r\n" if b"\r\n" in head else b"\n"
    stripped = newline.join(line for lines in kept for line in lines)
    return options, stripped + (separator or newline + newline) + body
