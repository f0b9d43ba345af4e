"""The domains the inbound listener takes mail for: DEFAULT_BOUNCE_DOMAIN, and every custom MAIL FROM
domain of a verified domain identity, as the identity service says. Its answers are kept a while and
dropped whenever an identity changes."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable

from postmesh.common.cache import TtlCache

# Answers are dropped on every IdentityChanged event; this bounds one missed while NATS reconnects.
CACHE_SECONDS = 300.0


class BounceDomains:
    def __init__(
        self,
        *,
        default_domain: str,
        lookup: Callable[[str], Awaitable[bool]],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._default = default_domain.lower().rstrip(".")
        self._lookup = lookup
        self._answers: TtlCache[str, bool] = TtlCache(CACHE_SECONDS, max_entries=10_000, clock=clock)

    async def accepts(self, domain: str) -> bool:
        """Raises what the lookup raises (the identity service unreachable): the caller defers."""
        domain = domain.lower().rstrip(".")
        if not domain:
            return False
        if domain == self._default:
            return True
        known = self._answers.get(domain)
        if known is None:
            known = await self._lookup(domain)
            self._answers.put(domain, known)
        return known

    def forget(self) -> None:
        self._answers.clear()
