"""Building the final MIME of an accepted message, and checking a caller's raw MIME (no gRPC here).

Output is wire-ready: CRLF line endings, 7-bit clean (non-ASCII headers as RFC 2047 words, bodies as
quoted-printable or base64), a Message-ID and a Date, and never a Bcc header.
"""

from __future__ import annotations

import binascii
import codecs
import datetime as dt
import os
import random
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from email import policy
from email.charset import QP, Charset
from email.errors import (
    HeaderParseError,
    InvalidMultipartContentTransferEncodingDefect,
    MessageDefect,
    MessageError,
    MissingHeaderBodySeparatorDefect,
    MultipartInvariantViolationDefect,
    NoBoundaryInMultipartDefect,
    StartBoundaryNotFoundDefect,
)
from email.header import Header as EncodedHeader
from email.header import decode_header
from email.message import Message
from email.mime.base import MIMEBase
from email.mime.multipart import MIMEMultipart
from email.mime.text import MIMEText
from email.parser import BytesParser
from email.utils import format_datetime, formataddr
from typing import Any

from postmesh.common.addresses import normalize_address
from postmesh.common.errors import InvalidArgument
from postmesh.common.mailformat import (
    BARE_CR,
    HEADER_LINE,
    MAX_LINE,
    check_wire,
    split_head,
    to_crlf,
    too_long_line,
)

# Moved to postmesh.common.mailformat (system mail uses them too); still importable from here.
from postmesh.common.mailformat import message_id_header as message_id_header
from postmesh.common.mailformat import new_message_id as new_message_id

# SES's limit, measured on the message as it goes out (after base64 and quoted-printable encoding).
MAX_MESSAGE_BYTES = 40 * 1024 * 1024

# Attachment types SES refuses (executables and scripts): docs.aws.amazon.com/ses/latest/dg/mime-types.html
REFUSED_EXTENSIONS = frozenset(
    """ade adp app asp bas bat cer chm cmd com cpl crt csh der exe fxp gadget hlp hta inf ins isp its js
    jse ksh lib lnk mad maf mag mam maq mar mas mat mau mav maw mda mdb mde mdt mdw mdz msc msh msh1 msh2
    mshxml msh1xml msh2xml msi msp mst ops pcd pif plg prf prg reg scf scr sct shb shs sys ps1 ps1xml ps2
    ps2xml psc1 psc2 tmp url vb vbe vbs vps vsmacros vss vst vsw vxd ws wsc wsf wsh xnk""".split()
)

# Headers postmesh writes itself; a caller's custom headers may not set them.
RESERVED_HEADERS = frozenset(
    h.lower()
    for h in (
        "From To Cc Bcc Reply-To Subject Date Message-ID MIME-Version Content-Type Sender Return-Path "
        "Content-Transfer-Encoding Content-Disposition DKIM-Signature X-SES-CONFIGURATION-SET "
        "X-SES-MESSAGE-TAGS"
    ).split()
)

# Headers of a caller's raw message that never go out: Bcc is envelope-only; Message-ID is ours;
# the X-SES-* headers are instructions to postmesh, as they are to SES.
_DROPPED_RAW_HEADERS = frozenset({"bcc", "message-id", "x-ses-configuration-set", "x-ses-message-tags"})

_FIELD_NAME = re.compile(r"^[\x21-\x39\x3b-\x7e]{1,76}$")  # printable US-ASCII except ':'
_STRUCTURAL_DEFECTS = (
    MissingHeaderBodySeparatorDefect,
    NoBoundaryInMultipartDefect,
    StartBoundaryNotFoundDefect,
    MultipartInvariantViolationDefect,
    InvalidMultipartContentTransferEncodingDefect,
)
# CRLF: the wire format (an SMTP client passes bytes through unchanged).
_POLICY = policy.compat32.clone(linesep="\r\n")


# C0 controls (TAB aside) and DEL: line breaks to the email package and to receivers (VT, FF, FS, GS,
# RS split lines in Python's str.splitlines), NUL cuts strings short in C-based MTAs.
_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")


def no_line_breaks(value: str, *, field: str) -> str:
    """Header injection guard: no header value may carry CR, LF, NUL or another control character."""
    if "\r" in value or "\n" in value:
        raise InvalidArgument(f"{field} must not contain line breaks (CR or LF).", field=field)
    if _CONTROL.search(value):
        raise InvalidArgument(f"{field} must not contain control characters.", field=field)
    if "=?" in value and _CONTROL.search(_decoded_words(value)):
        # Readers decode RFC 2047 words: one that decodes to CR/LF or a control smuggles it in.
        raise InvalidArgument(
            f"{field} has an encoded word that decodes to a control character.", field=field
        )
    return value


def _decoded_words(value: str) -> str:
    try:
        parts = decode_header(value)
    except (HeaderParseError, ValueError):
        return ""
    text = []
    for part, charset in parts:
        if isinstance(part, bytes):
            try:
                text.append(part.decode(charset or "ascii", "replace"))
            except LookupError:
                text.append(part.decode("ascii", "replace"))
        else:
            text.append(part)
    return "".join(text)


@dataclass(frozen=True)
class Mailbox:
    display_name: str
    address: str  # normalized: local@a-label-domain


_ANGLE_ADDR = re.compile(r"^(?P<name>.*?)\s*<(?P<address>[^<>]*)>$", re.DOTALL)
_QUOTED = re.compile(r'^"((?:[^"\\]|\\.)*)"$')


def parse_mailbox(value: str, *, field: str) -> Mailbox:
    """'Display Name <local@domain>' or a bare address; IDN domains become A-labels.

    Stricter than email.utils.getaddresses, which quietly drops spaces inside a domain."""
    no_line_breaks(value, field=field)
    text = value.strip()
    match = _ANGLE_ADDR.match(text)
    name, address = (match.group("name").strip(), match.group("address")) if match else ("", text)
    quoted = _QUOTED.match(name)
    if quoted:
        name = re.sub(r"\\(.)", r"\1", quoted.group(1))
    elif any(c in name for c in '"<>'):
        raise InvalidArgument(f"{value!r} is not a valid email address.", field=field)
    if not address or address != address.strip() or any(c.isspace() for c in address):
        raise InvalidArgument(f"{value!r} is not a valid email address.", field=field)
    return Mailbox(name, normalize_address(address, field=field))


@dataclass(frozen=True)
class Header:
    name: str
    value: str


def check_custom_headers(headers: Sequence[Header], *, field: str) -> None:
    for header in headers:
        if not _FIELD_NAME.match(header.name):
            raise InvalidArgument(f"{header.name!r} is not a valid header name.", field=field)
        if header.name.lower() in RESERVED_HEADERS:
            raise InvalidArgument(f"The {header.name} header is set by postmesh.", field=field)
        no_line_breaks(header.value, field=field)


@dataclass(frozen=True)
class Body:
    subject: str
    text: str
    html: str
    charset: str = "UTF-8"
    headers: Sequence[Header] = ()


@dataclass(frozen=True)
class Addressing:
    sender: Mailbox
    to: Sequence[Mailbox] = ()
    cc: Sequence[Mailbox] = ()
    reply_to: Sequence[Mailbox] = ()


# Longest run without white space a header may keep as it is: folding happens only at white space,
# and a line may not exceed 998 characters (RFC 5322 2.1.1).
_LONGEST_WORD = 900


def _header_text(value: str) -> str | EncodedHeader:
    """ASCII as is; anything else, or a word too long to fold, as RFC 2047 encoded words."""
    if value.isascii() and all(len(word) <= _LONGEST_WORD for word in value.split()):
        return value
    return EncodedHeader(value, "utf-8")


class _Unfolded:
    """A header value kept on one line (a Message-ID is one token: folding it would leave the line
    empty and the id on the next). compat32 asks a non-str value to encode() itself."""

    def __init__(self, value: str) -> None:
        self.value = value

    def encode(self, linesep: str = "\n", maxlinelen: int | None = None) -> str:
        return self.value

    def __str__(self) -> str:
        return self.value


def _mailbox_list(mailboxes: Sequence[Mailbox]) -> str:
    return ", ".join(formataddr((m.display_name, m.address), charset="utf-8") for m in mailboxes)


def _text_part(text: str, subtype: str, charset: Charset) -> MIMEText:
    part = MIMEText(text, subtype, charset)  # type: ignore[arg-type]  # a Charset is accepted too
    del part["MIME-Version"]  # the message has it once, at the top
    return part


# A MIME charset name (RFC 2978's mime-charset): it is written into the Content-Type header.
_CHARSET_NAME = re.compile(r"^[A-Za-z0-9!#$%&'+^_`{}~-]{1,40}$")
# Python text codecs that are no charset a mail reader knows.
_NOT_CHARSETS = frozenset({"punycode", "idna", "unicode-escape", "raw-unicode-escape", "undefined"})


def _body_charset(name: str) -> Charset:
    if not _CHARSET_NAME.match(name):
        raise InvalidArgument(f"{name!r} is not a charset name.", field="charset")
    try:
        codec = codecs.lookup(name)
    except LookupError:
        raise InvalidArgument(f"Unknown charset {name!r}.", field="charset") from None
    # base64, rot13, zlib, hex, uu...: codecs of bytes or text transforms, not character sets.
    if not getattr(codec, "_is_text_encoding", True) or codec.name in _NOT_CHARSETS:
        raise InvalidArgument(f"{name!r} is not a character set.", field="charset")
    charset = Charset(name)
    # Quoted-printable: readable when mostly ASCII, 7-bit clean and wrapped at 76 columns whatever
    # the lines given (SMTP allows at most 998).
    charset.body_encoding = QP
    return charset


def build_message(
    addressing: Addressing | None, body: Body, *, message_id: str | None, date: dt.datetime
) -> bytes:
    """The whole message. Without addressing (a template preview) it has no From or To.

    UTF-8 bodies are written directly (`_direct_message`); other charsets with the email package's
    compat32 classes, which give the same message for UTF-8, several times slower."""
    charset = _body_charset(body.charset)
    check_custom_headers(body.headers, field="headers")
    if addressing is not None:
        for mailbox in (addressing.sender, *addressing.to, *addressing.cc, *addressing.reply_to):
            no_line_breaks(mailbox.display_name, field="display name")
    data = _direct_message(addressing, body, charset, message_id=message_id, date=date)
    if data is None:
        data = _email_package_message(addressing, body, charset, message_id=message_id, date=date)
    check_wire(data, field="content")
    return data


def _email_package_message(
    addressing: Addressing | None, body: Body, charset: Charset, *, message_id: str | None, date: dt.datetime
) -> bytes:
    """build_message with the email package's compat32 classes (several times faster than
    EmailMessage with a modern policy)."""
    message: MIMEBase
    try:
        if body.text and body.html:
            message = MIMEMultipart("alternative")
            message.attach(_text_part(body.text, "plain", charset))
            message.attach(_text_part(body.html, "html", charset))
        else:
            message = MIMEText(body.text or body.html, "plain" if body.text else "html", charset)  # type: ignore[arg-type]
    except UnicodeEncodeError:
        raise InvalidArgument(
            f"The body cannot be written in the charset {body.charset!r}.", field="charset"
        ) from None
    for name, value in _fields(addressing, body, message_id=message_id, date=date):
        message[name] = value  # type: ignore[assignment]  # compat32 takes Header objects too
    return message.as_bytes(policy=_POLICY)


_FieldValue = str | EncodedHeader | _Unfolded


def _fields(
    addressing: Addressing | None, body: Body, *, message_id: str | None, date: dt.datetime
) -> list[tuple[str, _FieldValue]]:
    """The header fields after the MIME ones, in order, as compat32 takes them."""
    fields: list[tuple[str, _FieldValue]] = []
    if addressing is not None:
        fields.append(("From", _mailbox_list([addressing.sender])))
        if addressing.to:
            fields.append(("To", _mailbox_list(addressing.to)))
        if addressing.cc:
            fields.append(("Cc", _mailbox_list(addressing.cc)))
        if addressing.reply_to:
            fields.append(("Reply-To", _mailbox_list(addressing.reply_to)))
    fields.append(("Subject", _header_text(no_line_breaks(body.subject, field="subject"))))
    fields.append(("Date", format_datetime(date.astimezone(dt.UTC))))
    if message_id:
        fields.append(("Message-ID", _Unfolded(message_id)))
    fields += [(header.name, _header_text(header.value)) for header in body.headers]
    return fields


# compat32 folds a line at 78 characters; a printable ASCII value that fits goes out as it is.
_FOLD_AT = 78


def _field(name: str, value: _FieldValue) -> bytes:
    """The header field as compat32 writes it: direct when it fits on a line, else its folding."""
    if isinstance(value, str):
        if len(name) + len(value) + 2 <= _FOLD_AT and value.isascii() and value.isprintable():
            return f"{name}: {value}\r\n".encode("ascii")
    elif isinstance(value, _Unfolded) and value.value.isascii():
        return f"{name}: {value.value}\r\n".encode("ascii")
    return _POLICY.fold_binary(name, value)  # type: ignore[arg-type]  # compat32 takes Header objects


# Quoted-printable leaves these bytes as they are (with LF as the line break).
_QP_LITERAL = bytes([9, 10, *range(0x20, 0x3D), *range(0x3E, 0x7F)])
_QP_LINE = 76


def _quoted_printable(text: str) -> bytes:
    """The body as compat32's quoted-printable gives it once decoded: UTF-8, every line break (CR,
    LF or CRLF) a CRLF, lines wrapped at 76 with soft breaks. Printable ASCII without '=' or white
    space ending a line is its own encoding once wrapped; anything else goes through binascii's
    encoder, not the email package's pure-Python one."""
    data = text.replace("\r\n", "\n").replace("\r", "\n").encode("utf-8")
    if data.translate(None, _QP_LITERAL) or b" \n" in data or b"\t\n" in data or data.endswith((b" ", b"\t")):
        return binascii.b2a_qp(data).replace(b"\n", b"\r\n")
    lines = data.split(b"\n")
    if max(map(len, lines)) > _QP_LINE:
        lines = [line if len(line) <= _QP_LINE else _soft_wrapped(line) for line in lines]
    return b"\r\n".join(lines)


def _soft_wrapped(line: bytes) -> bytes:
    step = _QP_LINE - 1  # room for the '=' of a soft line break
    return b"=\r\n".join([line[start : start + step] for start in range(0, len(line), step)])


def _new_boundary() -> str:
    # compat32's form. Quoted-printable never holds "==", so it cannot occur in a part.
    return "=" * 15 + f"{random.randrange(sys.maxsize):019d}" + "=="


_QP = b"Content-Transfer-Encoding: quoted-printable\r\n"


def _direct_message(
    addressing: Addressing | None,
    body: Body,
    charset: Charset,
    *,
    message_id: str | None,
    date: dt.datetime,
    boundary: str | None = None,
) -> bytes | None:
    """build_message's bytes written directly for a UTF-8 message (the multipart boundary aside):
    the same header fields and folding as compat32's, bodies that decode the same. None for another
    charset (or a body UTF-8 cannot hold, which compat32 refuses)."""
    name = charset.get_output_charset()
    if str(charset) != name or codecs.lookup(name).name != "utf-8":
        return None
    try:
        parts = [
            (subtype, _quoted_printable(text))
            for subtype, text in (("plain", body.text), ("html", body.html))
            if text
        ]
    except UnicodeEncodeError:  # a lone surrogate
        return None
    if not parts:
        return None
    fields = [
        _field(name, value) for name, value in _fields(addressing, body, message_id=message_id, date=date)
    ]
    types = [_field("Content-Type", f'text/{subtype}; charset="{name}"') for subtype, _ in parts]
    if len(parts) == 1:  # compat32's order: Content-Type, MIME-Version, Content-Transfer-Encoding
        return b"".join([types[0], b"MIME-Version: 1.0\r\n", _QP, *fields, b"\r\n", parts[0][1]])
    delimiter = (boundary or _new_boundary()).encode("ascii")
    (_, text), (_, html) = parts
    return b"".join(
        [
            b'Content-Type: multipart/alternative;\r\n boundary="%s"\r\nMIME-Version: 1.0\r\n' % delimiter,
            *fields,
            b"\r\n--%s\r\n" % delimiter,
            types[0],
            _QP,
            b"\r\n",
            text,
            b"\r\n--%s\r\n" % delimiter,
            types[1],
            _QP,
            b"\r\n",
            html,
            b"\r\n--%s--\r\n" % delimiter,
        ]
    )


# --- Raw messages


@dataclass
class RawMessage:
    """What postmesh reads from a caller's raw MIME."""

    sender: Mailbox
    to: list[Mailbox] = field(default_factory=list)
    cc: list[Mailbox] = field(default_factory=list)
    bcc: list[Mailbox] = field(default_factory=list)
    subject: str = ""
    configuration_set: str = ""
    tags: list[tuple[str, str]] = field(default_factory=list)
    parsed: Message | None = None
    # The Sender header's mailbox (RFC 5322 3.6.2): the account must be allowed to send as it too.
    sender_header: Mailbox | None = None


# The email package's header parser raises these on header values it cannot take apart.
_HEADER_PARSE_ERRORS = (MessageError, ValueError, IndexError, TypeError, AttributeError, RecursionError)
# Postfix's mime_nesting_limit.
MAX_MIME_DEPTH = 100


def _header_values(message: Message, name: str, field: str) -> list[Any]:
    try:
        values = message.get_all(name) or []
        for value in values:
            no_line_breaks(str(value), field=f"{field} ({name} header)")
        return values
    except _HEADER_PARSE_ERRORS:
        raise InvalidArgument(f"The raw message's {name} header cannot be parsed.", field=field) from None


def _mailboxes(message: Message, name: str, field: str) -> list[Mailbox]:
    result = []
    for header in _header_values(message, name, field):
        try:
            addresses = list(getattr(header, "addresses", ()))
        except _HEADER_PARSE_ERRORS:
            raise InvalidArgument(f"The raw message's {name} header cannot be parsed.", field=field) from None
        for address in addresses:
            if address.addr_spec:
                no_line_breaks(address.display_name, field=f"{field} ({name} header)")
                result.append(
                    Mailbox(address.display_name, normalize_address(address.addr_spec, field=field))
                )
    return result


def _depth(message: Message) -> int:
    deepest, stack = 0, [(message, 1)]
    while stack:
        part, depth = stack.pop()
        deepest = max(deepest, depth)
        payload = part.get_payload() if part.is_multipart() else None
        if isinstance(payload, list):
            stack += [(child, depth + 1) for child in payload if isinstance(child, Message)]
    return deepest


def _check_raw_bytes(data: bytes, field: str) -> None:
    """Line endings are CRLF or LF (made CRLF on the way out); a bare CR would make receivers and
    postmesh disagree on where headers end (a Bcc header could go out, postmesh's own headers could
    land in the body), so it is refused, as are NUL bytes, 8-bit header bytes and long lines."""
    if b"\x00" in data:
        raise InvalidArgument("The raw message contains a NUL byte.", field=field, reason="MESSAGE_REJECTED")
    if BARE_CR.search(data):
        raise InvalidArgument(
            "The raw message contains a carriage return (CR) that does not end a line: lines end in CRLF.",
            field=field,
            reason="MESSAGE_REJECTED",
        )
    head, _ = split_head(data)
    if not head.isascii():
        raise InvalidArgument(
            "The raw message's headers must be 7-bit ASCII (use RFC 2047 encoded words).",
            field=field,
            reason="MESSAGE_REJECTED",
        )
    for number, line in enumerate(re.split(rb"\r?\n", head), start=1):
        if not HEADER_LINE.match(line):
            raise InvalidArgument(
                f"Line {number} of the raw message's header block is neither a header field nor a "
                "folded continuation line.",
                field=field,
            )
    long_line = too_long_line(data)
    if long_line is not None:
        raise InvalidArgument(
            f"Line {long_line} of the raw message is longer than {MAX_LINE} characters (RFC 5322).",
            field=field,
            reason="MESSAGE_REJECTED",
        )


def parse_raw(data: bytes) -> RawMessage:
    """Reads and checks a raw message; INVALID_ARGUMENT when it is not parseable MIME or has no From."""
    field = "content.raw.data"
    head, _ = split_head(data)
    if not data.strip() or not re.match(rb"^[\x21-\x39\x3b-\x7e]+:", head):
        raise InvalidArgument("The raw message does not start with a header block.", field=field)
    _check_raw_bytes(data, field)
    try:
        message = BytesParser(policy=policy.default).parsebytes(data)
        depth = _depth(message)
    except RecursionError:
        depth = MAX_MIME_DEPTH + 1
    if depth > MAX_MIME_DEPTH:
        raise InvalidArgument(
            f"The raw message's MIME parts are nested more than {MAX_MIME_DEPTH} deep.",
            field=field,
            reason="MESSAGE_REJECTED",
        )
    for part in message.walk():
        defects: list[MessageDefect] = list(part.defects)
        if any(isinstance(d, _STRUCTURAL_DEFECTS) for d in defects):
            raise InvalidArgument(f"The raw message is not valid MIME: {defects[0]!r}.", field=field)
    if not _header_values(message, "From", field):
        raise InvalidArgument("The raw message has no From header.", field=field)
    senders = _mailboxes(message, "From", field)
    if len(senders) != 1:
        raise InvalidArgument("The raw message's From must hold exactly one address.", field=field)
    raw = RawMessage(
        sender=senders[0],
        to=_mailboxes(message, "To", field),
        cc=_mailboxes(message, "Cc", field),
        bcc=_mailboxes(message, "Bcc", field),
        subject=_single(message, "Subject", field),
        configuration_set=_single(message, "X-SES-CONFIGURATION-SET", field).strip(),
        parsed=message,
    )
    sender_header = _mailboxes(message, "Sender", field)
    if len(sender_header) > 1:
        raise InvalidArgument("The raw message's Sender must hold one address.", field=field)
    raw.sender_header = sender_header[0] if sender_header else None
    tags = _single(message, "X-SES-MESSAGE-TAGS", field)
    for item in filter(None, (t.strip() for t in tags.split(","))):
        name, equals, value = item.partition("=")
        if not equals:
            raise InvalidArgument(f"X-SES-MESSAGE-TAGS item {item!r} is not name=value.", field=field)
        raw.tags.append((name.strip(), value.strip()))
    check_attachments(message)
    return raw


def _single(message: Message, name: str, field: str) -> str:
    values = _header_values(message, name, field)
    return str(values[0]) if values else ""


def check_attachments(message: Message) -> None:
    for part in message.walk():
        try:
            filename = part.get_filename()
        except _HEADER_PARSE_ERRORS:
            raise InvalidArgument(
                "A Content-Disposition or Content-Type header of the raw message cannot be parsed.",
                field="content.raw.data",
            ) from None
        if not filename:
            continue
        extension = os.path.splitext(filename.strip().lower())[1].lstrip(".")
        if extension in REFUSED_EXTENSIONS:
            raise InvalidArgument(
                f"Illegal filename '{filename}': attachments of type .{extension} are not allowed.",
                field="content.raw.data",
                reason="MESSAGE_REJECTED",
            )


def finalize_raw(data: bytes, *, message_id: str, date: dt.datetime) -> bytes:
    """The caller's message with our Message-ID, a Date and MIME-Version when missing, without Bcc.

    Edits the header block as bytes, so the body goes out exactly as given (CRLF line endings)."""
    head, body = split_head(data)
    fields: list[list[bytes]] = []
    for line in re.split(rb"\r?\n", head):
        if line[:1] in (b" ", b"\t") and fields:
            fields[-1].append(line)  # a folded continuation line
        elif line:
            fields.append([line])
    names = [f[0].split(b":", 1)[0].strip().lower().decode("ascii", "replace") for f in fields]
    kept = [f for f, n in zip(fields, names, strict=True) if n not in _DROPPED_RAW_HEADERS]
    added = [[f"Message-ID: {message_id}".encode()]]
    if "date" not in names:
        added.append([f"Date: {format_datetime(date.astimezone(dt.UTC))}".encode()])
    if "mime-version" not in names:
        added.append([b"MIME-Version: 1.0"])
    lines = [line for f in [*kept, *added] for line in f]
    normalized_body = to_crlf(body)
    final = b"\r\n".join(lines) + b"\r\n\r\n" + normalized_body
    check_wire(final, field="content.raw.data")
    return final
