"""DKIM signatures computed directly: the DKIM-Signature field dkimpy's `dkim.sign` gives, byte for byte.

dkimpy re-splits the whole message into lines with a regex and canonicalises every header with a few
more; that was half of its time on the mail postmesh writes itself (CRLF lines, a plain header block).
Here the header block is split once with `bytes.split`, relaxed canonicalisation is `bytes.split`
and `join`, the body hash is one `hashlib` call, and the RSA or Ed25519 operation is `cryptography`'s
with the key object parsed once per PEM. The signature field itself is folded with dkimpy's own
`fold` (and its tags taken from dkimpy's lists), so tag order and folding cannot drift from dkimpy's.

A message this does not take apart exactly as dkimpy would (a bare CR or LF, no header/body
separator, a header line dkimpy refuses or skips, vertical tab or form feed in the header block, no
From header) or inputs it does not know (another algorithm or canonicalisation, a selector or domain
outside the plain DNS characters, a key it cannot load) are signed by dkimpy.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import re
import time

import dkim
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed

PrivateKey = rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey

_SIGNED = frozenset(dkim.DKIM.SHOULD) | frozenset(dkim.DKIM.FROZEN)
_FROZEN = frozenset(dkim.DKIM.FROZEN)
_CANONICALIZATIONS = (b"relaxed", b"simple")
_HEADER_NAME = b"DKIM-Signature"
# dkim.sign's b= before signing: 60 characters, so that folding puts b= on a line of its own.
_PLACEHOLDER = b"0" * 60
# dkimpy's header-name pattern ([\x21-\x7e]+?:) up to the first colon; anything else it refuses or skips.
_FIELD_NAME = re.compile(rb"[\x21-\x39\x3b-\x7e]+\Z")
# What a selector or domain may hold here: plain DNS labels (nothing the b= blanking could mistake).
_DNS_NAME = re.compile(rb"[A-Za-z0-9_](?:[A-Za-z0-9_.-]*[A-Za-z0-9_])?\Z")


@functools.lru_cache(maxsize=1024)
def load_private_key(pem: bytes) -> PrivateKey:
    """The key object for a PEM (PKCS#1 or PKCS#8), parsed once: ValueError when it is neither an RSA
    nor an Ed25519 private key."""
    try:
        key = serialization.load_pem_private_key(pem, password=None)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"unparsable private key: {exc}") from exc
    if not isinstance(key, rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey):
        raise ValueError("not an RSA or Ed25519 private key")
    return key


@functools.lru_cache(maxsize=1024)
def ed25519_seed(pem: bytes) -> bytes:
    """dkimpy wants the 32-byte Ed25519 seed, base64; identity hands out PKCS#8 PEM."""
    key = load_private_key(pem)
    if not isinstance(key, ed25519.Ed25519PrivateKey):
        raise ValueError("not an ed25519 private key")
    return base64.b64encode(key.private_bytes_raw())


def sign(
    message: bytes,
    *,
    selector: bytes,
    domain: bytes,
    private_key_pem: bytes,
    algorithm: bytes,
    canonicalize: tuple[bytes, bytes],
) -> bytes:
    """The DKIM-Signature header field (ending in CRLF) `dkim.sign` gives for these inputs, with
    dkimpy's default header list; computed directly when possible, by dkimpy otherwise."""
    direct = direct_signature(
        message,
        selector=selector,
        domain=domain,
        private_key_pem=private_key_pem,
        algorithm=algorithm,
        canonicalize=canonicalize,
    )
    if direct is not None:
        return direct
    secret = ed25519_seed(private_key_pem) if algorithm == b"ed25519-sha256" else private_key_pem
    signature: bytes = dkim.sign(
        message,
        selector,
        domain,
        secret,
        signature_algorithm=algorithm,
        canonicalize=canonicalize,
        linesep=b"\r\n",
    )
    return signature


def _split_headers(message: bytes) -> tuple[list[tuple[bytes, bytes]], bytes] | None:
    """(name, raw value up to its last CRLF, continuation lines included) per header field, and the
    body; None when dkimpy's `rfc822_parse` might read the message otherwise."""
    if message.startswith(b"\r\n"):
        return None
    crlf = message.count(b"\r\n")
    if message.count(b"\r") != crlf or message.count(b"\n") != crlf:
        return None  # a bare CR or LF
    end = message.find(b"\r\n\r\n")
    if end < 0:
        return None
    head = message[:end]
    if b"\x0b" in head or b"\x0c" in head:
        return None  # white space to bytes.split, not to dkimpy's relaxed canonicalisation
    headers: list[tuple[bytes, bytes]] = []
    for line in head.split(b"\r\n"):
        first = line[:1]
        if first == b" " or first == b"\t":
            if not headers:
                return None
            name, value = headers[-1]
            headers[-1] = (name, value + b"\r\n" + line)
            continue
        colon = line.find(b":")
        if colon <= 0 or not _FIELD_NAME.match(line, 0, colon):
            return None
        headers.append((line[:colon], line[colon + 1 :]))
    return headers, message[end + 4 :]


def _body_hash(body: bytes, canonicalization: bytes) -> bytes:
    if canonicalization == b"relaxed":
        if b"\t" in body or b"  " in body or b" \r\n" in body:
            body = dkim.RelaxedCanonicalization.canonicalize_body(body)
        else:  # nothing to compress or strip: only the trailing empty lines
            body = body.rstrip(b"\r\n")
            body = body + b"\r\n" if body else b""
        return base64.b64encode(hashlib.sha256(body).digest())
    # simple: trailing empty lines dropped, one CRLF at the end (a CRLF-only body is one CRLF)
    digest = hashlib.sha256(body.rstrip(b"\r\n"))
    digest.update(b"\r\n")
    return base64.b64encode(digest.digest())


def direct_signature(
    message: bytes,
    *,
    selector: bytes,
    domain: bytes,
    private_key_pem: bytes,
    algorithm: bytes,
    canonicalize: tuple[bytes, bytes],
    timestamp: int | None = None,
) -> bytes | None:
    """The DKIM-Signature field `dkim.sign` gives, or None for what only dkimpy handles.

    `timestamp` (t=) defaults to now, as dkimpy's; tests pass dkimpy's to compare bytes."""
    header_canon, body_canon = canonicalize
    if header_canon not in _CANONICALIZATIONS or body_canon not in _CANONICALIZATIONS:
        return None
    if not (_DNS_NAME.match(selector) and _DNS_NAME.match(domain)):
        return None
    try:
        key = load_private_key(private_key_pem)
    except ValueError:
        return None
    if algorithm == b"rsa-sha256":
        if not isinstance(key, rsa.RSAPrivateKey):
            return None
    elif algorithm != b"ed25519-sha256" or not isinstance(key, ed25519.Ed25519PrivateKey):
        return None
    split = _split_headers(message)
    if split is None:
        return None
    headers, body = split

    # dkimpy's default_sign_headers and select_headers: each signed field, bottom-up for repeats.
    names = [name.lower() for name, _ in headers]
    included = [lower for lower in names if lower in _SIGNED]
    included += [lower for lower in included if lower in _FROZEN]
    if b"from" not in included:
        return None
    positions: dict[bytes, list[int]] = {}
    for index, lower in enumerate(names):
        if lower in _SIGNED:
            positions.setdefault(lower, []).append(index)
    relaxed = header_canon == b"relaxed"
    hashed: list[bytes] = []
    for lower in included:
        stack = positions[lower]
        if not stack:
            continue
        index = stack.pop()
        name, value = headers[index]
        if relaxed:
            hashed.append(lower + b":" + b" ".join(value.split()) + b"\r\n")
        else:
            hashed.append(name + b":" + value + b"\r\n")

    # The tags up to b=, joined once: the field before signing (b= a placeholder) and after share them.
    tags = b"; ".join(
        (
            b"v=1",
            b"a=" + algorithm,
            b"c=" + header_canon + b"/" + body_canon,
            b"d=" + domain,
            b"i=@" + domain,
            b"q=dns/txt",
            b"s=" + selector,
            b"t=" + str(int(time.time()) if timestamp is None else timestamp).encode("ascii"),
            b"h=" + b" : ".join(included),
            b"bh=" + _body_hash(body, body_canon),
            b"b=",
        )
    )
    namelen = len(_HEADER_NAME)
    unsigned = dkim.fold(tags + _PLACEHOLDER, namelen=namelen, linesep=b"\r\n")
    # dkimpy blanks b= with RE_BTAG; the placeholder is the only b= value and ends the field, unfolded.
    if unsigned.endswith(b"b=" + _PLACEHOLDER):
        unsigned = b" " + unsigned[: -len(_PLACEHOLDER)]
    else:
        unsigned = b" " + dkim.RE_BTAG.sub(b"\\1", unsigned)
    if relaxed:
        hashed.append(b"dkim-signature:" + b" ".join(unsigned.split()))
    else:
        hashed.append(_HEADER_NAME + b":" + unsigned.rstrip())
    digest = hashlib.sha256(b"".join(hashed)).digest()
    if isinstance(key, rsa.RSAPrivateKey):
        try:
            signature = key.sign(digest, padding.PKCS1v15(), Prehashed(hashes.SHA256()))
        except ValueError:
            return None  # a modulus too small for the digest: dkimpy says so
    else:
        signature = key.sign(digest)  # RFC 8463: Ed25519 over the SHA-256 of the header data
    value = tags + base64.b64encode(signature) + b"\r\n"
    return _HEADER_NAME + b": " + dkim.fold(value, namelen=namelen, linesep=b"\r\n")
