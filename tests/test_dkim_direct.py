"""The direct DKIM signer gives dkimpy's DKIM-Signature byte for byte (same tags, folding, bh= and
b=: PKCS#1 v1.5 and Ed25519 are deterministic), over fixed and generated messages, and what it signs
verifies with dkimpy and Perl's Mail::DKIM reading keys from a DNS server on loopback. What it does
not take apart exactly as dkimpy would goes to dkimpy."""

from __future__ import annotations

import base64
import datetime as dt
import re
from collections.abc import Iterator
from dataclasses import dataclass

import dkim
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa
from hypothesis import given
from hypothesis import strategies as st

from postmesh.testing_mail import LoopbackDns
from services.sender.dkim_direct import direct_signature, ed25519_seed, load_private_key, sign
from services.sender.dkim_signing import (
    ED25519_SHA256,
    RSA_SHA256,
    SigningConfig,
    SigningKey,
    sign_message,
)
from services.sender.mime import Addressing, Body, Header, build_message, parse_mailbox
from tests.dkim_verifiers import dkimpy_dns, perl_dkim_available, perl_dkim_result
from tests.fuzz_helpers import fuzz_settings

DOMAIN = b"example.test"
CANONICALIZATIONS = [(h, b) for h in (b"relaxed", b"simple") for b in (b"relaxed", b"simple")]


@dataclass(frozen=True)
class Key:
    selector: bytes
    algorithm: bytes
    pem: bytes


def _pem(key: rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


@pytest.fixture(scope="module")
def zone() -> Iterator[LoopbackDns]:
    with LoopbackDns() as server:
        yield server


@pytest.fixture(scope="module")
def keys(zone: LoopbackDns) -> list[Key]:
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    rsa_public = rsa_key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    ed_key = ed25519.Ed25519PrivateKey.generate()
    zone.add_txt("rsa1._domainkey.example.test", f"v=DKIM1; k=rsa; p={base64.b64encode(rsa_public).decode()}")
    ed_public = base64.b64encode(ed_key.public_key().public_bytes_raw()).decode()
    zone.add_txt("ed1._domainkey.example.test", f"v=DKIM1; k=ed25519; p={ed_public}")
    return [Key(b"rsa1", b"rsa-sha256", _pem(rsa_key)), Key(b"ed1", b"ed25519-sha256", _pem(ed_key))]


def _dkimpy(message: bytes, key: Key, canonicalize: tuple[bytes, bytes]) -> bytes:
    secret = ed25519_seed(key.pem) if key.algorithm == b"ed25519-sha256" else key.pem
    signature: bytes = dkim.sign(
        message,
        key.selector,
        DOMAIN,
        secret,
        signature_algorithm=key.algorithm,
        canonicalize=canonicalize,
        linesep=b"\r\n",
    )
    return signature


def _direct(
    message: bytes, key: Key, canonicalize: tuple[bytes, bytes], timestamp: int | None = None
) -> bytes | None:
    return direct_signature(
        message,
        selector=key.selector,
        domain=DOMAIN,
        private_key_pem=key.pem,
        algorithm=key.algorithm,
        canonicalize=canonicalize,
        timestamp=timestamp,
    )


def _same_as_dkimpy(message: bytes, key: Key, canonicalize: tuple[bytes, bytes]) -> bytes | None:
    """The direct signature (checked equal to dkimpy's, t= aside: dkimpy's clock is taken), or None."""
    expected = _dkimpy(message, key, canonicalize)
    found = re.search(rb"t=(\d+)", expected)
    assert found is not None
    direct = _direct(message, key, canonicalize, int(found.group(1)))
    if direct is not None:
        assert direct == expected
    return direct


def _verified(signed: bytes, zone: LoopbackDns) -> bool:
    return bool(dkim.DKIM(signed).verify(0, dnsfunc=dkimpy_dns(zone)))


NOW = dt.datetime(2026, 11, 28, 12, 0, tzinfo=dt.UTC)


def _built_messages() -> list[bytes]:
    sender = parse_mailbox("Zoë Sender <news@example.test>", field="from")
    many = [parse_mailbox(f"Person {i} <p{i}@example.test>", field="to") for i in range(30)]
    return [
        build_message(
            Addressing(sender, many[:1]),
            Body("Hello", "plain text\nsecond line\n", ""),
            message_id="<m1@example.test>",
            date=NOW,
        ),
        build_message(
            Addressing(sender, many, many[:3], many[3:4]),
            Body(
                "Grüße, a subject long enough to be folded over several lines " * 3,
                "héllo   world \t \n" * 200,
                "<p>hé</p>\n" * 100,
                headers=[Header("X-Campaign", "winter"), Header("List-Unsubscribe", "<mailto:u@x.test>")],
            ),
            message_id="<m2@example.test>",
            date=NOW,
        ),
        b"From: a@example.test\r\nSubject: empty body\r\n\r\n",
        b"From: a@example.test\r\nTo: b@example.test\r\n\r\nno final line break",
        b"From: a@example.test\r\nTo: b@example.test\r\n\r\n\r\n\r\n",
        b"FROM: a@example.test\r\nfrom: second@example.test\r\nTo:  b@example.test  \r\n"
        b"To:\tc@example.test,\r\n\t d@example.test\r\nX-Unsigned: x\r\nReceived: by relay\r\n"
        b"Subject:\r\n folded  \t subject \r\n\r\nbody  with\t\truns  \r\n\r\n\r\n",
    ]


@pytest.mark.parametrize("canonicalize", CANONICALIZATIONS, ids=lambda c: b"/".join(c).decode())
def test_byte_identical_to_dkimpy_and_verified(
    keys: list[Key], zone: LoopbackDns, canonicalize: tuple[bytes, bytes]
) -> None:
    for message in _built_messages():
        for key in keys:
            direct = _same_as_dkimpy(message, key, canonicalize)
            assert direct is not None, message[:200]
            assert _verified(direct + message, zone)


def test_the_signer_postmesh_uses_signs_directly_and_mail_dkim_agrees(
    keys: list[Key], zone: LoopbackDns
) -> None:
    message = _built_messages()[1]
    config = SigningConfig(
        "example.test",
        (
            SigningKey("rsa1", RSA_SHA256, keys[0].pem.decode()),
            SigningKey("ed1", ED25519_SHA256, keys[1].pem.decode()),
        ),
    )
    signed = sign_message(message, config)
    lookup = dkimpy_dns(zone)
    assert dkim.DKIM(signed).verify(0, dnsfunc=lookup) and dkim.DKIM(signed).verify(1, dnsfunc=lookup)
    if not perl_dkim_available():
        pytest.skip("Perl Mail::DKIM is not installed (apt-get install libmail-dkim-perl)")
    # Debian 12's Mail::DKIM checks RSA only: the RSA signature alone.
    rsa_signed = sign_message(message, SigningConfig("example.test", config.keys[:1]))
    assert perl_dkim_result(rsa_signed, zone.port) == "pass"
    assert perl_dkim_result(rsa_signed.replace(b"world", b"w0rld", 1), zone.port) != "pass"


# Shapes dkimpy reads its own way: bare LF or CR, a space before the colon, a continuation line
# first, an mbox "From " line, a vertical tab, no blank line, no From, a leading empty line.
ODD_MESSAGES = [
    b"From: a@example.test\nSubject: lf\n\nbody\n",
    b"From: a@example.test\r\nSubject: bare\rcr\r\n\r\nbody\r\n",
    b"From: a@example.test\r\nSubject : spaced\r\n\r\nbody\r\n",
    b" folded: first\r\nFrom: a@example.test\r\n\r\nbody\r\n",
    b"From a@example.test Sat Nov 28 12:00:00 2026\r\nFrom: a@example.test\r\n\r\nbody\r\n",
    b"From: a@example.test\r\nSubject: a\x0bvertical tab\r\n\r\nbody\r\n",
    b"From: a@example.test\r\nSubject: no body",
    b"\r\nFrom: a@example.test\r\n\r\nbody\r\n",
    b"To: b@example.test\r\nSubject: no from\r\n\r\nbody\r\n",
]


def test_odd_shapes_go_to_dkimpy(keys: list[Key], zone: LoopbackDns) -> None:
    for message in ODD_MESSAGES:
        for key in keys:
            assert _direct(message, key, (b"relaxed", b"simple")) is None, message
            try:
                expected = _dkimpy(message, key, (b"relaxed", b"simple"))
            except (dkim.DKIMException, IndexError) as exc:  # dkimpy refuses it, from either path
                with pytest.raises(type(exc)):
                    sign(
                        message,
                        selector=key.selector,
                        domain=DOMAIN,
                        private_key_pem=key.pem,
                        algorithm=key.algorithm,
                        canonicalize=(b"relaxed", b"simple"),
                    )
                continue
            signature = sign(
                message,
                selector=key.selector,
                domain=DOMAIN,
                private_key_pem=key.pem,
                algorithm=key.algorithm,
                canonicalize=(b"relaxed", b"simple"),
            )
            assert signature.split(b"t=")[0] == expected.split(b"t=")[0]
            assert _verified(signature + message, zone)


def test_inputs_it_does_not_know_go_to_dkimpy(keys: list[Key]) -> None:
    message = _built_messages()[0]
    rsa_key, ed_key = keys
    assert _direct(message, Key(b"rsa1", b"rsa-sha1", rsa_key.pem), (b"relaxed", b"simple")) is None
    assert _direct(message, Key(b"rsa1", b"ed25519-sha256", rsa_key.pem), (b"relaxed", b"simple")) is None
    assert _direct(message, Key(b"ed1", b"rsa-sha256", ed_key.pem), (b"relaxed", b"simple")) is None
    assert _direct(message, Key(b"bad;sel", b"rsa-sha256", rsa_key.pem), (b"relaxed", b"simple")) is None
    assert _direct(message, rsa_key, (b"nowsp", b"simple")) is None
    assert _direct(message, Key(b"rsa1", b"rsa-sha256", b"not a key"), (b"relaxed", b"simple")) is None
    with pytest.raises(dkim.KeyFormatError):
        sign(
            message,
            selector=b"rsa1",
            domain=DOMAIN,
            private_key_pem=b"not a key",
            algorithm=b"rsa-sha256",
            canonicalize=(b"relaxed", b"simple"),
        )
    with pytest.raises(ValueError):
        sign(
            message,
            selector=b"ed1",
            domain=DOMAIN,
            private_key_pem=rsa_key.pem,
            algorithm=b"ed25519-sha256",
            canonicalize=(b"relaxed", b"simple"),
        )


def test_a_key_is_parsed_once_per_pem(keys: list[Key]) -> None:
    assert load_private_key(keys[0].pem) is load_private_key(bytes(keys[0].pem))


# --- Generated messages

_NAMES = st.sampled_from(
    [
        "From",
        "FROM",
        "from",
        "To",
        "Cc",
        "Subject",
        "Date",
        "Message-ID",
        "MIME-Version",
        "Content-Type",
        "Content-Transfer-Encoding",
        "Reply-To",
        "Sender",
        "References",
        "List-Unsubscribe",
        "X-Campaign",
        "Received",
        "Return-Path",
        "X-Empty",
    ]
)
_WHITE = st.sampled_from([" ", "  ", "\t", " \t ", "   "])
_WORD = st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), min_size=1, max_size=12)


@st.composite
def _header_value(draw: st.DrawFn) -> bytes:
    """Words, white-space runs, folds (CRLF before white space), leading and trailing white space."""
    parts = [draw(_WHITE) if draw(st.booleans()) else ""]
    for word in draw(st.lists(_WORD, max_size=8)):
        parts.append(word)
        if draw(st.integers(0, 3)) == 0:
            parts.append("\r\n" + draw(_WHITE))
        else:
            parts.append(draw(_WHITE))
    if draw(st.booleans()):
        parts.append(draw(_WHITE))
    return "".join(parts).encode("ascii")


_BODY_LINE = st.one_of(
    st.binary(max_size=80).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b"")),
    st.text(st.sampled_from(list("ab .=\t é日")), max_size=60).map(lambda t: t.encode("utf-8")),
    st.just(b""),
    st.just(b"   "),
    st.just(b"\t"),
)


@st.composite
def _messages(draw: st.DrawFn) -> bytes:
    headers = [(name, draw(_header_value())) for name in draw(st.lists(_NAMES, max_size=12))]
    headers.insert(draw(st.integers(0, len(headers))), ("From", b" a@example.test"))
    head = b"".join(name.encode() + b":" + value + b"\r\n" for name, value in headers)
    lines = draw(st.lists(_BODY_LINE, max_size=20))
    body = b"\r\n".join(lines)
    if draw(st.booleans()):
        body += b"\r\n" * draw(st.integers(1, 3))
    return head + b"\r\n" + body


@given(message=_messages(), canonicalize=st.sampled_from(CANONICALIZATIONS), which=st.integers(0, 1))
@fuzz_settings(examples=150)
def test_generated_messages_sign_as_dkimpy_does(
    keys: list[Key], zone: LoopbackDns, message: bytes, canonicalize: tuple[bytes, bytes], which: int
) -> None:
    key = keys[which]
    direct = _same_as_dkimpy(message, key, canonicalize)
    assert direct is not None, message
    assert _verified(direct + message, zone)


@given(
    message=_messages(),
    position=st.integers(0, 10_000),
    odd=st.sampled_from([b"\n", b"\r", b"\x0b", b"\x0c", b" ", b":", b"\r\n\r\n", b"\r\n", b"\r\n "]),
)
@fuzz_settings(examples=100)
def test_damaged_messages_sign_as_dkimpy_does_or_go_to_dkimpy(
    keys: list[Key], message: bytes, position: int, odd: bytes
) -> None:
    at = position % (len(message) + 1)
    damaged = message[:at] + odd + message[at:]
    for key in keys:
        try:
            _same_as_dkimpy(damaged, key, (b"relaxed", b"simple"))
        except (dkim.DKIMException, IndexError):
            assert _direct(damaged, key, (b"relaxed", b"simple")) is None
