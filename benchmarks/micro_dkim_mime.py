"""Micro-benchmark of the sender's two CPU hot spots per message, before and after their direct
versions: DKIM signing (dkimpy against services/sender/dkim_direct.py, RSA-2048 and Ed25519) and
building a ~5 KB text+HTML SendEmail message (the email package's compat32 classes and the regex
line-length check against services/sender/mime.py's direct builder).

    .venv/bin/python benchmarks/micro_dkim_mime.py [--number 300] [--repeat 7]

Prints microseconds per message, the best of the repeats (the machine is shared: the minimum is the
figure least disturbed by other work)."""

from __future__ import annotations

import argparse
import datetime as dt
import time
from collections.abc import Callable

import dkim
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

from postmesh.common.mailformat import _LONG_LINE, check_wire, too_long_line
from services.sender import dkim_signing  # installs dkimpy's cryptography-backed RSA, as production
from services.sender.dkim_direct import direct_signature, ed25519_seed
from services.sender.mime import (
    Addressing,
    Body,
    Header,
    Mailbox,
    _body_charset,
    _email_package_message,
    build_message,
)

NOW = dt.datetime(2026, 11, 28, 12, 0, tzinfo=dt.UTC)
PARAGRAPH = (
    "Hello Ada,\n\nYour order 4711 has shipped and should arrive on Thursday. You can follow the\n"
    "parcel with the link below; the carrier updates it every few hours.\n\n"
)


def _message_parts() -> tuple[Addressing, Body]:
    text = PARAGRAPH * 13
    html = "".join(f"<p>{p}</p>\n" for p in text.split("\n\n") if p)
    addressing = Addressing(
        Mailbox("Example Shop", "orders@shop.example.test"), [Mailbox("Ada Lovelace", "ada@example.test")]
    )
    body = Body("Your order 4711 has shipped", text, html, headers=[Header("X-Campaign", "shipping")])
    return addressing, body


def _best(run: Callable[[], object], number: int, repeat: int) -> float:
    """Microseconds per call, the best of `repeat` rounds of `number` calls."""
    rounds = []
    for _ in range(repeat):
        start = time.perf_counter()
        for _ in range(number):
            run()
        rounds.append((time.perf_counter() - start) / number * 1e6)
    return min(rounds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--number", type=int, default=300, help="calls per round")
    parser.add_argument("--repeat", type=int, default=7, help="rounds (the best is printed)")
    args = parser.parse_args()
    addressing, body = _message_parts()
    mime = build_message(addressing, body, message_id="<bench@shop.example.test>", date=NOW)
    charset = _body_charset(body.charset)

    def old_build() -> bytes:
        data = _email_package_message(addressing, body, charset, message_id="<bench@x.test>", date=NOW)
        _LONG_LINE.search(data)  # the regex line-length pass check_wire made before
        check_wire(data, field="content")
        return data

    def new_build() -> bytes:
        return build_message(addressing, body, message_id="<bench@x.test>", date=NOW)

    rsa_pem = rsa.generate_private_key(public_exponent=65537, key_size=2048).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    ed_pem = ed25519.Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    assert dkim_signing.CANONICALIZE == (b"relaxed", b"simple")
    rows = [
        ("build a SendEmail message (text+HTML)", old_build, new_build),
        ("of which: line-length check", lambda: _LONG_LINE.search(mime), lambda: too_long_line(mime)),
    ]
    for label, algorithm, pem, secret in (
        ("DKIM sign, RSA-2048", b"rsa-sha256", rsa_pem, rsa_pem),
        ("DKIM sign, Ed25519", b"ed25519-sha256", ed_pem, ed25519_seed(ed_pem)),
    ):

        def before(algorithm: bytes = algorithm, secret: bytes = secret) -> bytes:
            signature: bytes = dkim.sign(
                mime,
                b"sel",
                b"shop.example.test",
                secret,
                signature_algorithm=algorithm,
                canonicalize=dkim_signing.CANONICALIZE,
                linesep=b"\r\n",
            )
            return signature

        def after(algorithm: bytes = algorithm, pem: bytes = pem) -> bytes | None:
            return direct_signature(
                mime,
                selector=b"sel",
                domain=b"shop.example.test",
                private_key_pem=pem,
                algorithm=algorithm,
                canonicalize=dkim_signing.CANONICALIZE,
            )

        assert after() is not None
        rows.append((label, before, after))
    print(f"message: {len(mime)} bytes; best of {args.repeat} x {args.number} calls, µs per message")
    print(f"{'':40} {'before':>9} {'after':>9} {'ratio':>7}")
    for label, old, new in rows:
        old()
        new()
        slow = _best(old, args.number, args.repeat)
        fast = _best(new, args.number, args.repeat)
        print(f"{label:40} {slow:9.1f} {fast:9.1f} {slow / fast:6.1f}x")


if __name__ == "__main__":
    main()
