"""The one cache type (postmesh.common.cache) and the caches built on it."""

from __future__ import annotations

from postmesh.common.cache import TtlCache, within_domain
from services.sender.dkim_signing import SigningConfig, SigningConfigCache


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_entries_expire_after_their_time_to_live() -> None:
    clock = Clock()
    cache: TtlCache[str, int] = TtlCache(30, clock=clock)
    cache.put("a", 1)
    clock.now += 29.9
    assert cache.get("a") == 1
    clock.now += 0.2
    assert cache.get("a") is None
    assert cache.keys() == []


def test_the_oldest_entries_go_first_beyond_the_bound() -> None:
    cache: TtlCache[int, int] = TtlCache(30, max_entries=3)
    for n in range(5):
        cache.put(n, n)
    assert sorted(cache.keys()) == [2, 3, 4]
    cache.put(2, 20)  # put again: now the newest
    cache.put(5, 5)
    assert sorted(cache.keys()) == [2, 4, 5]


def test_discard_by_key_and_by_predicate() -> None:
    cache: TtlCache[tuple[str, str], str] = TtlCache(30)
    for domain in ("example.test", "mail.example.test", "a.b.example.test", "otherexample.test"):
        cache.put(("acct", domain), domain)
    cache.discard(("acct", "otherexample.test"))
    assert cache.discard_where(lambda key, _: within_domain(key[1], "b.example.test")) == 1
    assert sorted(k[1] for k in cache.keys()) == ["example.test", "mail.example.test"]


def test_within_domain() -> None:
    assert within_domain("Mail.Example.test", "example.TEST")
    assert within_domain("example.test.", "example.test")
    assert not within_domain("badexample.test", "example.test")
    assert not within_domain("example.test", "mail.example.test")


async def test_a_dkim_change_to_a_domain_drops_its_subdomains_signing_configuration() -> None:
    fetched: list[str] = []

    async def fetch(account_id: str, domain: str) -> SigningConfig:
        fetched.append(domain)
        return SigningConfig(domain)

    cache = SigningConfigCache(fetch, ttl_seconds=300)
    for domain in ("example.test", "news.example.test", "other.test"):
        await cache.get("acct", domain)
    await cache.get("acct", "news.example.test")
    assert fetched == ["example.test", "news.example.test", "other.test"]  # kept
    cache.forget("example.test")
    assert cache.domains() == {"other.test"}
    await cache.get("acct", "news.example.test")
    assert fetched[-1] == "news.example.test"
    cache.forget("someone@other.test")  # an address identity names its domain
    assert cache.domains() == {"news.example.test"}
