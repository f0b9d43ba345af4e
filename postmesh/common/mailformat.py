"""Standard mail as postmesh sends it, whoever queues it (the sender's SendEmail, identity's
verification mail, quota's account notices): one Message-ID format, and one check of the wire form
before a message is queued. No service code here."""

from __future__ import annotations

import datetime as dt
import re
import secrets
from email import policy
from email.message import EmailMessage

from postmesh.common.errors import InvalidArgument


def new_message_id(now: dt.datetime) -> str:
    """SES-like: time-ordered (milliseconds, hex) then random, e.g. 0000019abc...-1f2e...-000000."""
    millis = int(now.timestamp() * 1000)
    # One draw of 16 random bytes (one system call, not five), cut into the same groups.
    r = secrets.token_hex(16)
    return f"{millis:016x}-{r[:8]}-{r[8:12]}-{r[12:16]}-{r[16:20]}-{r[20:32]}-000000"


def message_id_header(message_id: str, domain: str) -> str:
    return f"<{message_id}@{domain}>"


def split_head(data: bytes) -> tuple[bytes, bytes]:
    match = re.search(rb"\r?\n\r?\n", data)
    if match is None:
        return data, b""
    return data[: match.start()], data[match.end() :]


def to_crlf(data: bytes) -> bytes:
    """SMTP's line ending everywhere: every LF preceded by a CR (C passes, not a regex's). Mail
    postmesh wrote is CRLF already and is returned as it is, not copied twice."""
    if data.count(b"\n") == data.count(b"\r\n"):
        return data
    return data.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")


BARE_CR = re.compile(rb"\r(?!\n)")
HEADER_LINE = re.compile(rb"^(?:[\x21-\x39\x3b-\x7e]+[ \t]*:|[ \t])")
MAX_LINE = 998


_LONG_LINE = re.compile(rb"[^\r\n]{%d}" % (MAX_LINE + 1))


def too_long_line(data: bytes) -> int | None:
    """The number of the first line longer than 998 characters (line breaks aside), if any."""
    # bytes.splitlines breaks at CR, LF and CRLF, as the pattern does: a C pass where the regex took
    # a millisecond per 5 KB. The regex only finds the line's number when there is one.
    if len(data) <= MAX_LINE or max(map(len, data.splitlines())) <= MAX_LINE:
        return None
    match = _LONG_LINE.search(data)
    return None if match is None else data.count(b"\n", 0, match.start()) + 1


def check_wire(data: bytes, *, field: str) -> None:
    """What goes out is standard mail (docs/sending.md promises it): no NUL, no bare CR, lines of at most
    998 characters, a 7-bit header block of well-formed fields. MESSAGE_REJECTED otherwise."""

    def refuse(text: str) -> None:
        raise InvalidArgument(
            f"The message is not standard mail: {text}.", field=field, reason="MESSAGE_REJECTED"
        )

    if b"\x00" in data:
        refuse("it contains a NUL byte")
    if BARE_CR.search(data):
        refuse("it contains a carriage return (CR) that does not end a line")
    long_line = too_long_line(data)
    if long_line is not None:
        refuse(f"line {long_line} is longer than {MAX_LINE} characters")
    head, _ = split_head(data)
    if not head.isascii():
        refuse("its header block has 8-bit characters (use RFC 2047 encoded words)")
    for number, line in enumerate(re.split(rb"\r?\n", head), start=1):
        if not HEADER_LINE.match(line):
            refuse(f"header line {number} is not a header field or a folded continuation")


def system_message(
    message: EmailMessage, *, message_id: str, sender: str, message_id_domain: str = ""
) -> bytes:
    """Mail postmesh sends on its own behalf (verification, account notices), finished as SendEmail's:
    the same Message-ID form (<id@MESSAGE_ID_DOMAIN or the From domain>), CRLF, and the same check."""
    del message["Message-ID"]
    domain = message_id_domain or sender.rpartition("@")[2]
    message["Message-ID"] = message_id_header(message_id, domain)
    data = message.as_bytes(policy=policy.SMTP)
    check_wire(data, field="system message")
    return data
