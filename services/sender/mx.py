"""Where mail for a domain goes: MX records in preference order, the A/AAAA fallback, null MX.

Resolution failures are classified here, so the delivery code only sees "these hosts, in this order"
or a failure that is permanent (no such domain, null MX, no addresses) or transient (try later).
"""

from __future__ import annotations

import asyncio
import random
from dataclasses import dataclass

import dns.asyncresolver
import dns.exception
import dns.name
import dns.rdatatype
import dns.resolver


@dataclass(frozen=True)
class MxHost:
    name: str
    preference: int
    addresses: tuple[str, ...]


class RouteError(Exception):
    """No route to the domain now. `status` is the enhanced status code a bounce or delay reports."""

    def __init__(self, message: str, *, permanent: bool, status: str) -> None:
        super().__init__(message)
        self.permanent = permanent
        self.status = status


class MxResolver:
    def __init__(self, nameservers: list[str], *, port: int = 53, timeout: float = 10.0) -> None:
        # configure=False with our own nameservers never reads /etc/resolv.conf (tests stay on loopback).
        self._resolver = dns.asyncresolver.Resolver(configure=not nameservers)
        if nameservers:
            self._resolver.nameservers = list(nameservers)
        self._resolver.port = port
        self._resolver.lifetime = timeout
        # Honours each record's TTL: a burst of mail to one domain resolves it once.
        self._resolver.cache = dns.resolver.Cache()

    async def _query(self, name: str, rdtype: str) -> dns.resolver.Answer | None:
        """The answer, None for "no such record", raising RouteError(permanent) for NXDOMAIN."""
        try:
            return await self._resolver.resolve(name, rdtype, search=False)
        except dns.resolver.NXDOMAIN:
            raise RouteError(f"{name}: no such domain", permanent=True, status="5.1.2") from None
        except dns.resolver.NoAnswer:
            return None
        except (dns.resolver.NoNameservers, dns.exception.Timeout) as exc:
            raise RouteError(
                f"{name}: DNS {rdtype} look-up failed: {exc}", permanent=False, status="4.4.3"
            ) from None

    async def _addresses(self, host: str) -> tuple[str, ...]:
        answers = await asyncio.gather(
            self._query(host, "A"), self._query(host, "AAAA"), return_exceptions=True
        )
        addresses: list[str] = []
        errors = [a for a in answers if isinstance(a, BaseException)]
        for answer in answers:
            if isinstance(answer, dns.resolver.Answer):
                addresses.extend(r.address for r in answer)
        if not addresses and errors:
            raise errors[0]
        return tuple(addresses)

    async def resolve(self, domain: str) -> list[MxHost]:
        """The domain's mail hosts, most preferred first (equal preferences shuffled, RFC 5321 5.1),
        each with its addresses; hosts without addresses are left out."""
        answer = await self._query(domain, "MX")
        if answer is None:  # no MX: the domain itself is the implicit MX (RFC 5321 5.1)
            candidates = [(0, domain)]
        else:
            records = [(r.preference, r.exchange) for r in answer]
            if any(exchange == dns.name.root for _, exchange in records):
                raise RouteError(
                    f"{domain} does not accept mail (null MX, RFC 7505)", permanent=True, status="5.1.10"
                )
            random.shuffle(records)
            records.sort(key=lambda r: r[0])
            candidates = [(pref, exchange.to_text(omit_final_dot=True)) for pref, exchange in records]
        hosts: list[MxHost] = []
        transient: RouteError | None = None
        for preference, name in candidates:
            try:
                addresses = await self._addresses(name)
            except RouteError as exc:
                if not exc.permanent:
                    transient = exc
                continue
            if addresses:
                hosts.append(MxHost(name=name, preference=preference, addresses=addresses))
        if hosts:
            return hosts
        if transient is not None:
            raise transient
        raise RouteError(
            f"{domain}: no address for its mail server(s) {', '.join(n for _, n in candidates)}",
            permanent=True,
            status="5.4.4",
        )
