"""Which webhook URLs and NATS subjects a destination may point at.

A webhook is a request postmesh makes on a user's behalf, so a URL must not reach what only postmesh
can reach: never link-local or cloud metadata addresses, never postmesh's own ports, and loopback or
private networks only when the operator allows them (WEBHOOK_ALLOW_PRIVATE_TARGETS, for development
and tests). Host names are checked again when each request is made (see `check_address`), since DNS
can change after the destination was created.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable
from urllib.parse import urlsplit

from postmesh.common.errors import InvalidArgument

MAX_URL = 2048
_SUBJECT_TOKEN = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_FIELD = "event_destination.webhook.url"


def _bad(message: str) -> InvalidArgument:
    return InvalidArgument(message, field=_FIELD, reason="INVALID_WEBHOOK_URL")


IpAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
_THIS_NETWORK = ipaddress.ip_network("0.0.0.0/8")
_NAT64 = ipaddress.ip_network("64:ff9b::/96")


def check_address(address: IpAddress, *, allow_private: bool) -> None:
    """Refuses an address a webhook may never reach (raises InvalidArgument)."""
    if isinstance(address, ipaddress.IPv6Address):
        # IPv4 inside IPv6 (mapped, 6to4, NAT64) reaches the IPv4 address: judge that one.
        embedded = address.ipv4_mapped or address.sixtofour
        if embedded is None and address in _NAT64:
            embedded = ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
        if embedded is not None:
            check_address(embedded, allow_private=allow_private)
    if (
        address in _THIS_NETWORK
        or address.is_link_local
        or address.is_multicast
        or address.is_unspecified
        or address.is_reserved
    ):
        raise _bad(f"A webhook may not point at {address}: link-local, metadata or reserved address.")
    if (address.is_loopback or address.is_private) and not allow_private:
        raise _bad(
            f"A webhook may not point at {address}: loopback and private addresses are refused "
            "(WEBHOOK_ALLOW_PRIVATE_TARGETS allows them for development)."
        )


def check_webhook_url(url: str, *, allow_private: bool, own_endpoints: Iterable[str] = ()) -> str:
    """The URL, if a webhook may point at it; InvalidArgument otherwise."""
    if not url or len(url) > MAX_URL:
        raise _bad(f"The webhook URL must be 1 to {MAX_URL} characters.")
    if any(c.isspace() or ord(c) < 32 for c in url):
        raise _bad("The webhook URL must not contain spaces or control characters.")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        raise _bad("The webhook URL is not a valid URL.") from None
    if parts.scheme not in ("http", "https"):
        raise _bad("The webhook URL must be http:// or https://.")
    if parts.username is not None or parts.password is not None or "@" in parts.netloc:
        raise _bad("The webhook URL must not carry credentials; the signature authenticates postmesh.")
    host = (parts.hostname or "").lower()
    if not host:
        raise _bad("The webhook URL needs a host.")
    port = port or (443 if parts.scheme == "https" else 80)
    try:
        address: IpAddress | None = ipaddress.ip_address(host)
    except ValueError:
        address = None
        if host == "localhost" or host.endswith(".localhost"):
            address = ipaddress.ip_address("127.0.0.1")
        elif host in ("metadata", "metadata.google.internal") or host.endswith(".internal"):
            raise _bad("A webhook may not point at a cloud metadata service.") from None
    if address is not None:
        check_address(address, allow_private=allow_private)
    for endpoint in own_endpoints:
        own_host, _, own_port = endpoint.rpartition(":")
        own_host = own_host.strip("[]").lower()
        # A port on every interface is reached through this host's own (loopback or private) addresses.
        every_interface = own_host in ("", "0.0.0.0", "::")
        same_host = own_host == host or (
            address is not None
            and (address.is_loopback or address.is_unspecified or (every_interface and address.is_private))
        )
        if own_port.isdigit() and int(own_port) == port and same_host:
            raise _bad("A webhook may not point at postmesh itself.")
    return url


def check_subject(subject: str) -> str:
    """A user's NATS subject: dot-separated tokens of letters, digits, '_' and '-', no wildcards."""
    tokens = subject.split(".")
    if not subject or len(subject) > 200 or not all(_SUBJECT_TOKEN.match(t) for t in tokens):
        raise InvalidArgument(
            "The NATS subject must be dot-separated tokens of letters, digits, '_' or '-' (no wildcards).",
            field="event_destination.nats_subject.subject",
        )
    return subject


def full_subject(prefix: str, account_id: str, subject: str) -> str:
    return f"{prefix}.{account_id}.{subject}"
