"""Email address and domain syntax, shared by every service (RFC 5321/5322 subset, IDNA domains)."""

from __future__ import annotations

import functools
import re
from email.headerregistry import Address
from email.utils import parseaddr

import idna

from postmesh.common.errors import InvalidArgument

# Dot-atom local part (RFC 5322 3.2.3); quoted local parts are rare and refused by most providers.
_LOCAL_PART = re.compile(r"^[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+(\.[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+)*$")
_LABEL = re.compile(r"^(?!-)[a-z0-9-]{1,63}(?<!-)$")


def normalize_domain(domain: str, *, field: str = "domain") -> str:
    """The domain as an ASCII (A-label) lower-case name; INVALID_ARGUMENT naming `field` otherwise."""
    ascii_name = _ascii_domain(domain.strip().rstrip("."))
    if ascii_name is None:
        raise InvalidArgument(f"{domain!r} is not a valid domain name.", field=field)
    return ascii_name


# IDNA processing is slow and every message names a few domains, mostly the same ones.
@functools.lru_cache(maxsize=4096)
def _ascii_domain(raw: str) -> str | None:
    if not raw or any(c in raw for c in "\r\n\t @"):
        return None
    try:
        ascii_name = idna.encode(raw, uts46=True).decode("ascii").lower()
    except idna.IDNAError:
        return None
    labels = ascii_name.split(".")
    if len(ascii_name) > 253 or len(labels) < 2 or not all(_LABEL.match(label) for label in labels):
        return None
    if labels[-1].isdigit():
        return None
    return ascii_name


def normalize_address(address: str, *, field: str = "email_address") -> str:
    """A bare address `local@domain` with the domain as an A-label in lower case.

    The local part keeps its case (RFC 5321 says it may matter); compare with `address_key`.
    """
    if any(c in address for c in "\r\n"):
        raise InvalidArgument("Addresses must not contain line breaks.", field=field)
    text = address.strip()
    local, at, domain = text.rpartition("@")
    if not at or not local or len(local) > 64 or not _LOCAL_PART.match(local):
        raise InvalidArgument(f"{address!r} is not a valid email address.", field=field)
    return f"{local}@{normalize_domain(domain, field=field)}"


def address_key(address: str) -> str:
    """The form addresses are compared in (suppression list, verified identities): all lower case."""
    return address.lower()


def parse_mailbox(value: str, *, field: str) -> tuple[str, str]:
    """Splits 'Display Name <local@domain>' into (display name, normalized address)."""
    if any(c in value for c in "\r\n"):
        raise InvalidArgument("Header values must not contain line breaks.", field=field)
    name, addr = parseaddr(value)
    if not addr:
        raise InvalidArgument(f"{value!r} is not a valid email address.", field=field)
    return name, normalize_address(addr, field=field)


def format_mailbox(display_name: str, address: str) -> str:
    """A header-ready mailbox, encoding a non-ASCII display name as RFC 2047 needs."""
    local, _, domain = address.rpartition("@")
    return str(Address(display_name=display_name, username=local, domain=domain))


def domain_of(address: str) -> str:
    return address.rpartition("@")[2]
