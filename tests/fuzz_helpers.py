"""Hostile input for the fuzz suite: strings, protobuf messages built field by field from their
descriptors, invalid UTF-8 put on the wire, and checks of what a receiver got."""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from email import message_from_bytes, policy
from typing import Any

import grpc
from google.protobuf import descriptor as _descriptor
from google.protobuf.message import Message
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

FieldDescriptor = _descriptor.FieldDescriptor

# `make test` runs a bounded number of examples per test; POSTMESH_FUZZ_EXAMPLES raises it (make fuzz).
EXAMPLES = int(os.environ.get("POSTMESH_FUZZ_EXAMPLES", "25"))


def fuzz_settings(examples: int = EXAMPLES) -> settings:
    return settings(
        max_examples=examples,
        deadline=None,  # a shared machine: behaviour is asserted, never speed
        derandomize=os.environ.get("POSTMESH_FUZZ_RANDOM", "") == "",
        suppress_health_check=list(HealthCheck),
        database=None,
    )


# The characters that broke something once: line breaks, C0 controls, DEL, NUL, 8-bit text, a
# right-to-left mark, a surrogate-free astral character, quoting and header syntax.
_HOSTILE_CHARS = st.sampled_from(
    list("\r\n\t\x00\x01\x07\x08\x0b\x0c\x1b\x1c\x1d\x1e\x1f\x7f\x85\u2028\u200f")
    + list('"<>@,;:\\()[]=?_ ')
    + ["é", "ü", "日", "😀", "\ufeff"]
)
_FRAGMENTS = st.sampled_from(
    [
        "=?utf-8?q?a=0D=0ABcc:_x@example.test?=",
        "=?utf-8?b?DQpCY2M6IHhAZXhhbXBsZS50ZXN0?=",
        "\r\nBcc: spy@example.test",
        "\rBcc: spy@example.test",
        "{{#each a}}{{#each a}}{{this}}{{/each}}{{/each}}",
        "{{",
        "}}",
        "%s%n",
        "a@example.test",
        "Name <a@example.test>",
        "../../etc/passwd",
        "x" * 1200,
    ]
)


def _hostile(max_size: int) -> st.SearchStrategy[str]:
    pieces = st.one_of(st.text(max_size=8), st.text(_HOSTILE_CHARS, max_size=8), _FRAGMENTS)
    return st.lists(pieces, max_size=max_size // 8 + 1).map("".join)


_PRINTABLE = st.characters(min_codepoint=0x20, max_codepoint=0x7E)
_WORDS = st.characters(categories=("L", "N", "P", "S", "Zs"))


def hostile_text(max_size: int = 40) -> st.SearchStrategy[str]:
    """Mostly text a sender would send (so enough is accepted to check what goes out), often
    hostile: controls, line breaks, encoded words, template syntax, very long words."""
    printable = st.text(_PRINTABLE, min_size=1, max_size=max_size).filter(lambda s: bool(s.strip()))
    return st.one_of(printable, printable, st.text(_WORDS, min_size=1, max_size=max_size), _hostile(max_size))


def _scalar(field: FieldDescriptor) -> st.SearchStrategy[Any]:
    kind = field.type
    if kind == FieldDescriptor.TYPE_STRING:
        return hostile_text()
    if kind == FieldDescriptor.TYPE_BYTES:
        return st.one_of(st.binary(max_size=64), hostile_text().map(lambda s: s.encode("utf-8")))
    if kind == FieldDescriptor.TYPE_BOOL:
        return st.booleans()
    if field.enum_type is not None:
        numbers = [v.number for v in field.enum_type.values]
        return st.one_of(st.sampled_from(numbers), st.integers(-3, 1000))
    if kind in (FieldDescriptor.TYPE_DOUBLE, FieldDescriptor.TYPE_FLOAT):
        return st.one_of(
            st.floats(allow_nan=True, allow_infinity=True, width=32),
            st.sampled_from([0.0, -1.0, 1e308, float("nan"), float("inf")]),
        )
    unsigned = kind in (
        FieldDescriptor.TYPE_UINT32,
        FieldDescriptor.TYPE_UINT64,
        FieldDescriptor.TYPE_FIXED32,
    )
    bits = (
        64
        if kind in (FieldDescriptor.TYPE_INT64, FieldDescriptor.TYPE_UINT64, FieldDescriptor.TYPE_SINT64)
        else 32
    )
    low, high = (0, 2**bits - 1) if unsigned else (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1)
    return st.one_of(st.integers(low, high), st.sampled_from([low, high, 0, 1, -1 if low < 0 else 2]))


@st.composite
def messages(draw: st.DrawFn, descriptor: _descriptor.Descriptor, depth: int = 0) -> Message:
    """A message of `descriptor`'s type with each field set or not, strings hostile."""
    from google.protobuf import message_factory

    message = message_factory.GetMessageClass(descriptor)()
    for field in descriptor.fields:
        if not draw(st.booleans()):
            continue
        repeated = field.is_repeated
        child_type = field.message_type
        if child_type is not None:
            if depth >= 3 or child_type.GetOptions().map_entry:
                continue
            if child_type.full_name.startswith("google.protobuf."):
                continue  # well-known types: their own checks, not ours
            count = draw(st.integers(1, 3)) if repeated else 1
            for _ in range(count):
                child = draw(messages(child_type, depth + 1))
                if repeated:
                    getattr(message, field.name).add().CopyFrom(child)
                else:
                    getattr(message, field.name).CopyFrom(child)
        elif repeated:
            getattr(message, field.name).extend(draw(st.lists(_scalar(field), max_size=3)))
        else:
            setattr(message, field.name, draw(_scalar(field)))
    return message


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _length_delimited(number: int, payload: bytes) -> bytes:
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def string_paths(descriptor: _descriptor.Descriptor, depth: int = 0) -> list[tuple[int, ...]]:
    """Field-number paths to every string field (through message fields, a few levels deep)."""
    paths: list[tuple[int, ...]] = []
    for field in descriptor.fields:
        if field.type == FieldDescriptor.TYPE_STRING:
            paths.append((field.number,))
        elif field.message_type is not None and depth < 3:
            paths += [(field.number, *rest) for rest in string_paths(field.message_type, depth + 1)]
    return paths


INVALID_UTF8 = [b"\xff", b"\xc3\x28", b"\xed\xa0\x80", b"abc\xe2\x82", b"\xf8\x88\x80\x80\x80", b"\xc0\xaf"]


def with_invalid_utf8(serialized: bytes, path: tuple[int, ...], payload: bytes) -> bytes:
    """`serialized` with one more occurrence of the string field at `path` holding `payload`: the last
    occurrence of a singular field wins and a repeated field gains an item, so the request carries
    invalid UTF-8 where a client library would never put it."""
    encoded = _length_delimited(path[-1], payload)
    for number in reversed(path[:-1]):
        encoded = _length_delimited(number, encoded)
    return serialized + encoded


def raw_call(channel: grpc.Channel, method: str) -> Callable[..., bytes]:
    """A unary call that sends and returns bytes as they are."""
    return channel.unary_unary(method, request_serializer=None, response_deserializer=None)


NEVER = (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN, grpc.StatusCode.DEADLINE_EXCEEDED)


# --- What a receiver got


def check_wire_message(data: bytes, *, bcc: list[str]) -> None:
    """RFC 5322 as sent: CRLF lines of at most 998 characters, 7-bit header block without NUL, no
    Bcc header and no Bcc address anywhere in the header block, and it parses without defects of
    structure."""
    assert b"\x00" not in data, "NUL byte in the message"
    assert not re.search(rb"\r(?!\n)", data), "bare CR in the message"
    assert not re.search(rb"(?<!\r)\n", data), "bare LF in the message"
    for line in data.split(b"\r\n"):
        assert len(line) <= 998, f"line of {len(line)} characters"
    head, separator, _ = data.partition(b"\r\n\r\n")
    assert separator, "no header/body separator"
    assert head.isascii(), "8-bit bytes in the header block"
    for line in head.split(b"\r\n"):
        assert line[:1] in (b" ", b"\t") or re.match(rb"^[\x21-\x39\x3b-\x7e]+:", line), line[:200]
    assert not re.search(rb"(?im)^bcc:", head), "Bcc header disclosed"
    lowered = head.lower()
    for address in bcc:
        assert address.lower().encode() not in lowered, f"Bcc address {address} disclosed"
    parsed = message_from_bytes(data, policy=policy.default)
    assert parsed["From"] is not None
    assert len(parsed.get_all("Message-ID") or []) == 1
