"""DKIM signing: signing configurations, their cache, and one signature per key.

Signatures are computed by `dkim_direct` (dkimpy's bytes without its parsing), falling back to dkimpy
for messages or inputs it does not take. For that fallback: dkimpy signs RSA with pure-Python big
numbers (~136 RSA-2048 signatures/s on one core). It looks up `RSASSA_PKCS1_v1_5_sign` and
`parse_pem_private_key` by name in its own module namespace, so we put cryptography-backed functions
with the same contracts there, with each parsed key cached: the signature bytes are identical
(PKCS#1 v1.5 is deterministic), only faster. Ed25519 goes through dkimpy's own PyNaCl path, fed the
raw seed it expects (`dkim_direct.ed25519_seed`).
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import dkim
import dkim.crypto
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa, utils

from postmesh.common.cache import TtlCache, within_domain
from services.sender import dkim_direct
from services.sender.dkim_direct import load_private_key

log = logging.getLogger(__name__)

RSA_SHA256 = "rsa-sha256"
ED25519_SHA256 = "ed25519-sha256"
# As SES signs: relaxed headers survive the re-folding relays do; a simple body costs no regex pass
# over the whole body (relaxed/relaxed signs ~25% slower here).
CANONICALIZE = (b"relaxed", b"simple")

_HASHES: dict[str, Callable[[], hashes.HashAlgorithm]] = {"sha256": hashes.SHA256, "sha1": hashes.SHA1}


class _RsaKey(dict[str, int]):
    """dkimpy's private-key dict, also carrying the parsed cryptography key."""

    crypto_key: rsa.RSAPrivateKey


@functools.lru_cache(maxsize=1024)
def _parse_pem_private_key(pem: bytes) -> _RsaKey:
    try:
        key = load_private_key(pem)
    except ValueError as exc:
        raise dkim.crypto.UnparsableKeyError(str(exc)) from exc
    if not isinstance(key, rsa.RSAPrivateKey):
        raise dkim.crypto.UnparsableKeyError("not an RSA private key")
    numbers = key.private_numbers()
    parsed = _RsaKey(
        modulus=numbers.public_numbers.n,
        publicExponent=numbers.public_numbers.e,
        privateExponent=numbers.d,
        prime1=numbers.p,
        prime2=numbers.q,
        exponent1=numbers.dmp1,
        exponent2=numbers.dmq1,
        coefficient=numbers.iqmp,
    )
    parsed.crypto_key = key
    return parsed


@functools.lru_cache(maxsize=1024)
def _key_from_numbers(n: int, e: int, d: int, p: int, q: int, dmp1: int, dmq1: int, iqmp: int) -> Any:
    return rsa.RSAPrivateNumbers(p, q, d, dmp1, dmq1, iqmp, rsa.RSAPublicNumbers(e, n)).private_key()


def rsassa_pkcs1_v1_5_sign(hash: Any, private_key: dict[str, int]) -> bytes:
    """dkimpy's `RSASSA_PKCS1_v1_5_sign(hash, key_dict)` contract, signed by cryptography."""
    key = getattr(private_key, "crypto_key", None)
    if key is None:  # a key dict dkimpy parsed itself
        key = _key_from_numbers(
            private_key["modulus"],
            private_key["publicExponent"],
            private_key["privateExponent"],
            private_key["prime1"],
            private_key["prime2"],
            private_key["exponent1"],
            private_key["exponent2"],
            private_key["coefficient"],
        )
    algorithm = _HASHES[hash.name.lower()]()
    signature: bytes = key.sign(hash.digest(), padding.PKCS1v15(), utils.Prehashed(algorithm))
    return signature


def install_fast_rsa() -> None:
    """Makes dkimpy sign RSA through cryptography (idempotent)."""
    dkim.RSASSA_PKCS1_v1_5_sign = rsassa_pkcs1_v1_5_sign
    dkim.parse_pem_private_key = _parse_pem_private_key


install_fast_rsa()


@dataclass(frozen=True)
class SigningKey:
    selector: str
    algorithm: str  # rsa-sha256 or ed25519-sha256
    private_key_pem: str


@dataclass(frozen=True)
class SigningConfig:
    domain: str
    keys: tuple[SigningKey, ...] = ()


def sign_message(mime: bytes, config: SigningConfig) -> bytes:
    """`mime` (CRLF) with one DKIM-Signature per key prepended; unchanged when there is no key.

    Each signature is computed over the unsigned message, so neither covers the other and a
    verifier may check either."""
    signatures: list[bytes] = []
    domain = config.domain.encode("ascii")
    for key in config.keys:
        if key.algorithm not in (RSA_SHA256, ED25519_SHA256):
            log.warning("unknown DKIM algorithm skipped", extra={"algorithm": key.algorithm})
            continue
        signatures.append(
            dkim_direct.sign(
                mime,
                selector=key.selector.encode("ascii"),
                domain=domain,
                private_key_pem=key.private_key_pem.encode("ascii"),
                algorithm=key.algorithm.encode("ascii"),
                canonicalize=CANONICALIZE,
            )
        )
    return b"".join(signatures) + mime


class SigningUnavailable(Exception):
    """The signing keys could not be fetched now (identity unreachable): retry the message later."""


FetchConfig = Callable[[str, str], Awaitable[SigningConfig]]


class SigningConfigCache:
    """Signing configurations per (owner account, domain), fetched from identity on first use and
    dropped when identity announces a change of the domain (or after `ttl_seconds` regardless)."""

    def __init__(
        self, fetch: FetchConfig, *, ttl_seconds: float = 300.0, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._fetch = fetch
        self._entries: TtlCache[tuple[str, str], SigningConfig] = TtlCache(ttl_seconds, clock=clock)

    async def get(self, account_id: str, domain: str) -> SigningConfig:
        key = (account_id, domain.lower())
        kept = self._entries.get(key)
        if kept is not None:
            return kept
        config = await self._fetch(account_id, domain.lower())
        self._entries.put(key, config)
        return config

    def domains(self) -> set[str]:
        return {domain for _, domain in self._entries.keys()}

    def forget(self, identity: str) -> None:
        """Drops what is cached for an identity's domain (an address identity names its domain) and
        for its subdomains: mail from a subdomain is signed with its parent's keys when it has none."""
        domain = identity.rpartition("@")[2].lower()
        self._entries.discard_where(lambda key, _: within_domain(key[1], domain))
