"""Open and click tracking on the delivery path: the HTML parts of a message get their http(s) links
pointed at the tracking endpoint and a 1x1 pixel, before DKIM signing.

Per message, not per recipient, as SES tracks: a message is signed once for all its recipients, so
every recipient gets the same URLs, and an open or click event names the message (its destination
lists every recipient), not who opened it. The URLs are a pure function of the message and the
secret, so a retried delivery sends recipients exactly what the first attempt sent.

Only text/html parts that are not attachments change; text parts, attachments and headers are kept
byte for byte. An HTML part is decoded (transfer encoding and charset), rewritten, and encoded again
the same way; a 7bit or 8bit part whose rewritten lines no longer fit becomes quoted-printable.
"""

from __future__ import annotations

import asyncio
import base64
import email
import email.quoprimime
import html
import io
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass
from email.generator import BytesGenerator
from email.message import Message
from email.policy import compat32
from html.parser import HTMLParser
from urllib.parse import quote, urlsplit, urlunsplit

from postmesh.common.addresses import normalize_domain
from postmesh.common.errors import InvalidArgument
from postmesh.common.tracking import CLICK_PATH, OPEN_PATH, TokenSigner, TrackedMail, tracking_base
from postmesh.events.v1 import events_pb2
from postmesh.events.v1 import tracking_pb2 as tracking_events
from postmesh.sender.v1 import queue_pb2, tracking_pb2

log = logging.getLogger(__name__)

# SES's link tags: ses:tags="name1:value1;name2:value2", names and values of these characters.
_TAG_PART = re.compile(r"^[A-Za-z0-9_\-]{1,256}$")
MAX_LINE = 998
_URL_SAFE = "!#$%&'()*+,-./:;=?@[]~_|^{}`\\"
_C0_AND_SPACE = "".join(chr(c) for c in range(0x21))
_NON_ASCII = re.compile("[^\x00-\x7f\udc80-\udcff]")
_PIXEL = (
    '<img src="{src}" width="1" height="1" alt="" '
    'style="display:block;height:1px;width:1px;border:0;margin:0;padding:0" />'
)

LinkUrl = Callable[[str, list[tracking_events.LinkTag]], str]


def link_tags(value: str | None) -> list[tracking_events.LinkTag]:
    tags = []
    for pair in (value or "").split(";"):
        name, sep, tag_value = pair.strip().partition(":")
        if sep and _TAG_PART.match(name.strip()) and _TAG_PART.match(tag_value.strip()):
            tags.append(tracking_events.LinkTag(name=name.strip(), value=tag_value.strip()))
    return tags


def normalize_link(href: str) -> str:
    """The URL a browser follows for this href: tabs and line breaks dropped (as the URL standard
    does), other controls, spaces and non-ASCII characters percent-encoded, so that it is also a valid
    Location header."""
    link = re.sub(r"[\t\r\n]", "", href).strip(_C0_AND_SPACE)
    try:
        parts = urlsplit(link)
        host = parts.hostname or ""
    except ValueError:
        return quote(link, safe=_URL_SAFE)
    if not host.isascii():
        try:
            ascii_host = normalize_domain(host)
        except InvalidArgument:
            ascii_host = None
        if ascii_host is not None:  # an internationalized host name goes as its A-label
            netloc = parts.netloc.rpartition("@")
            host_port = netloc[2].lower().replace(host, ascii_host, 1)
            link = urlunsplit(parts._replace(netloc=netloc[0] + netloc[1] + host_port))
    return quote(link, safe=_URL_SAFE)


def _trackable(href: str) -> bool:
    try:
        parts = urlsplit(href.strip())
    except ValueError:
        return False
    return parts.scheme.lower() in ("http", "https") and bool(parts.netloc)


class _Anchors(HTMLParser):
    """Finds each <a> start tag (its offset and exact source text) and the last </body>."""

    def __init__(self, text: str) -> None:
        super().__init__(convert_charrefs=True)
        self.text = text
        self._line_starts = [0] + [m.end() for m in re.finditer("\n", text)]
        self.anchors: list[tuple[int, str, list[tuple[str, str | None]]]] = []
        self.body_end: int | None = None

    def _offset(self) -> int:
        line, column = self.getpos()
        return self._line_starts[line - 1] + column

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "a":
            raw = self.get_starttag_text() or ""
            offset = self._offset()
            if raw and self.text.startswith(raw, offset):
                self.anchors.append((offset, raw, attrs))

    def handle_endtag(self, tag: str) -> None:
        if tag == "body":
            offset = self._offset()
            if self.text.startswith("</", offset):
                self.body_end = offset


def _attribute(value: str) -> str:
    # Character references for what the part's charset may not hold (surrogates stand for raw bytes
    # of the source and go back as they came).
    return _NON_ASCII.sub(lambda m: f"&#{ord(m.group())};", html.escape(value, quote=True))


def _anchor(attrs: list[tuple[str, str | None]]) -> str:
    # Always an open tag: HTML ignores "/>" on <a>, and "<a href=x/>" is an href ending in "/".
    parts = ["<a"]
    for name, value in attrs:
        parts.append(f" {name}" if value is None else f' {name}="{_attribute(value)}"')
    parts.append(">")
    return "".join(parts)


def rewrite_html(text: str, *, link_url: LinkUrl | None, pixel_url: str | None) -> str:
    """`text` with its trackable links replaced by `link_url(link, tags)` and the pixel before the
    last </body> (at the end when there is none). Anchors with ses:no-track keep their link."""
    parser = _Anchors(text)
    parser.feed(text)
    parser.close()
    edits: list[tuple[int, int, str]] = []
    if link_url is not None:
        for offset, raw, attrs in parser.anchors:
            names = {name for name, _ in attrs}
            href = next((value for name, value in attrs if name == "href"), None)
            if "ses:no-track" in names or href is None:
                continue
            link = normalize_link(href)
            if not _trackable(link):
                continue
            tags = link_tags(next((value for name, value in attrs if name == "ses:tags"), None))
            tracked = link_url(link, tags)
            new_attrs = [(name, tracked if name == "href" else value) for name, value in attrs]
            edits.append((offset, offset + len(raw), _anchor(new_attrs)))
    if pixel_url is not None:
        at = parser.body_end if parser.body_end is not None else len(text)
        edits.append((at, at, _PIXEL.format(src=_attribute(pixel_url))))
    for start, end, replacement in sorted(edits, key=lambda e: e[0], reverse=True):
        text = text[:start] + replacement + text[end:]
    return text


def _fits_7bit_or_8bit(data: bytes, seven_bit: bool) -> bool:
    if seven_bit and not data.isascii():
        return False
    if b"\0" in data:
        return False
    lines = data.replace(b"\r\n", b"\n").split(b"\n")
    return all(len(line) <= MAX_LINE and b"\r" not in line for line in lines)


def _ascii_compatible(charset: str) -> bool:
    return "a\r\n".encode(charset) == b"a\r\n"


def _set_body(part: Message, data: bytes, cte: str, charset: str) -> None:
    if cte != "base64" and not _ascii_compatible(charset):
        cte = "base64"  # UTF-16 and the like: line-oriented encodings would cut its code units
    if cte == "base64":
        encoded = base64.encodebytes(data).decode("ascii")
    elif cte in ("7bit", "8bit", "") and _fits_7bit_or_8bit(data, seven_bit=cte != "8bit"):
        # As the parser keeps raw bytes: surrogate escapes stand for the non-ASCII ones.
        encoded = data.decode("ascii", "surrogateescape")
    else:
        cte = "quoted-printable"
        encoded = email.quoprimime.body_encode(data.decode("latin-1"), eol="\n")
    part.set_payload(encoded)
    if "Content-Transfer-Encoding" in part:
        part.replace_header("Content-Transfer-Encoding", cte or "7bit")
    elif cte:
        part["Content-Transfer-Encoding"] = cte


def _rewrite_part(part: Message, rewrite: Callable[[str], str]) -> bool:
    """Rewrites one HTML part in place; False (part untouched) when it cannot be read faithfully."""
    cte = str(part.get("Content-Transfer-Encoding", "")).strip().lower()
    if cte not in ("", "7bit", "8bit", "quoted-printable", "base64"):
        return False  # binary or unknown: leave it as it is
    raw = part.get_payload(decode=True)
    if not isinstance(raw, bytes):
        return False
    charset = part.get_content_charset() or "us-ascii"
    try:
        text = raw.decode(charset, "surrogateescape")
        data = rewrite(text).encode(charset, "surrogateescape")
    except (LookupError, UnicodeError):
        return False
    _set_body(part, data, cte, charset)
    return True


@dataclass(frozen=True)
class Tracker:
    """Writes one message's tracked URLs: `base` is the endpoint as recipients reach it."""

    signer: TokenSigner

    def urls(
        self, base: str, message_id: str, account_id: str
    ) -> tuple[Callable[[str, list[tracking_events.LinkTag]], str], str]:
        def link_url(link: str, tags: list[tracking_events.LinkTag]) -> str:
            token = tracking_pb2.TrackingToken(
                message_id=message_id, account_id=account_id, link=link, link_tags=tags
            )
            return f"{base}/{CLICK_PATH}/{self.signer.sign(token)}"

        pixel = tracking_pb2.TrackingToken(message_id=message_id, account_id=account_id)
        return link_url, f"{base}/{OPEN_PATH}/{self.signer.sign(pixel)}"

    def apply(
        self,
        mime: bytes,
        *,
        base: str,
        message_id: str,
        account_id: str,
        options: tracking_pb2.TrackingOptions,
    ) -> bytes:
        """The message with its HTML parts tracked as `options` ask; `mime` itself when nothing changed."""
        if not (options.opens or options.clicks):
            return mime
        link_url, pixel_url = self.urls(base, message_id, account_id)

        def rewrite(text: str) -> str:
            return rewrite_html(
                text,
                link_url=link_url if options.clicks else None,
                pixel_url=pixel_url if options.opens else None,
            )

        try:
            return self._rewrite(mime, rewrite)
        except Exception:
            # Malformed MIME that the email package reads but cannot write back (a multipart inside a
            # multipart with the same boundary, say): the message goes as it came, untracked.
            log.warning("message not tracked: its MIME cannot be rewritten", extra={"id": message_id})
            return mime

    @staticmethod
    def _rewrite(mime: bytes, rewrite: Callable[[str], str]) -> bytes:
        message = email.message_from_bytes(mime, policy=compat32)
        changed = False
        for part in message.walk():
            if part.is_multipart() or part.get_content_type() != "text/html":
                continue
            if str(part.get("Content-Disposition", "")).strip().lower().startswith("attachment"):
                continue
            changed = _rewrite_part(part, rewrite) or changed
        if not changed:
            return mime
        out = io.BytesIO()
        BytesGenerator(out, mangle_from_=False, policy=compat32.clone(linesep="\r\n")).flatten(message)
        return out.getvalue()


class MessageTracking:
    """The delivery workers' side of tracking: rewrites a tracked message and keeps its mail object
    where the endpoint finds it for the events."""

    def __init__(
        self,
        *,
        signer: TokenSigner,
        public_url: str,
        listen: str,
        mails: TrackedMail,
    ) -> None:
        self.tracker = Tracker(signer)
        self.public_url = public_url
        self.listen = listen
        self.mails = mails

    async def apply(self, queued: queue_pb2.QueuedMessage, mime: bytes, mail: events_pb2.Mail) -> bytes:
        options = queued.tracking
        if not (options.opens or options.clicks):
            return mime
        if queued.attempt == 0:  # later attempts carry only the recipients left
            await self.mails.remember(mail)
        base = tracking_base(self.public_url, self.listen, options.custom_redirect_domain)
        return await asyncio.to_thread(
            self.tracker.apply,
            mime,
            base=base,
            message_id=queued.message_id,
            account_id=queued.account_id,
            options=options,
        )
