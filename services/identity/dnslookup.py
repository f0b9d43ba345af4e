"""DNS lookups for identity verification, through a configurable resolver (dnspython)."""

from __future__ import annotations

from dataclasses import dataclass, field

import dns.asyncresolver
import dns.exception
import dns.resolver

# SES's VerificationError names.
HOST_NOT_FOUND = "HOST_NOT_FOUND"
TYPE_NOT_FOUND = "TYPE_NOT_FOUND"
DNS_SERVER_ERROR = "DNS_SERVER_ERROR"
INVALID_VALUE = "INVALID_VALUE"


@dataclass(frozen=True)
class Lookup:
    """Answers to one query: TXT strings joined per record, or MX exchanges; or why there are none."""

    values: list[str] = field(default_factory=list)
    error: str = ""

    @property
    def transient(self) -> bool:
        return self.error == DNS_SERVER_ERROR


class DnsLookup:
    def __init__(self, resolver_address: str, timeout: float) -> None:
        if resolver_address:
            host, _, port = resolver_address.rpartition(":")
            if not host:
                host, port = port, "53"
            resolver = dns.asyncresolver.Resolver(configure=False)
            resolver.nameservers = [host.strip("[]")]
            resolver.port = int(port)
        else:
            resolver = dns.asyncresolver.Resolver()
        resolver.lifetime = timeout
        resolver.timeout = timeout
        # Answers must be fresh: a record removed a minute ago must fail the next check.
        resolver.cache = None
        self._resolver = resolver

    async def _query(self, name: str, rdtype: str) -> tuple[list[object], str]:
        try:
            answer = await self._resolver.resolve(name, rdtype, search=False)
        except dns.resolver.NXDOMAIN:
            return [], HOST_NOT_FOUND
        except dns.resolver.NoAnswer:
            return [], TYPE_NOT_FOUND
        except (dns.resolver.NoNameservers, dns.exception.Timeout, OSError):
            return [], DNS_SERVER_ERROR
        except dns.exception.DNSException:
            return [], DNS_SERVER_ERROR
        return list(answer), ""

    async def txt(self, name: str) -> Lookup:
        records, error = await self._query(name, "TXT")
        values = [b"".join(r.strings).decode("utf-8", "replace") for r in records]  # type: ignore[attr-defined]
        return Lookup(values, error)

    async def mx(self, name: str) -> Lookup:
        records, error = await self._query(name, "MX")
        values = [r.exchange.to_text(omit_final_dot=True).lower() for r in records]  # type: ignore[attr-defined]
        return Lookup(values, error)
