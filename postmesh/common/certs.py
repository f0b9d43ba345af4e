"""Self-signed certificates for the listeners that make their own when none is configured (the SMTP
server's dev certificate, the inbound listener's STARTTLS, the SNS signing certificate)."""

from __future__ import annotations

import datetime as dt
import ipaddress
from collections.abc import Sequence

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

PrivateKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey


def self_signed(
    names: Sequence[str],
    *,
    key: PrivateKey | None = None,
    days: int = 3650,
    ca: bool = False,
    now: dt.datetime | None = None,
) -> tuple[x509.Certificate, PrivateKey]:
    """A certificate for `names` (DNS names or IP addresses; the first is the common name), signed by
    its own key: `key`, or a new P-256 key."""
    key = key or ec.generate_private_key(ec.SECP256R1())
    now = now or dt.datetime.now(dt.UTC)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0][:64] or "postmesh")])
    alt: list[x509.GeneralName] = []
    for name in names:
        try:
            alt.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            alt.append(x509.DNSName(name))
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=1))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName(alt), critical=False)
    )
    if ca:
        builder = builder.add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
    return builder.sign(key, hashes.SHA256()), key


def pem(cert: x509.Certificate, key: PrivateKey) -> tuple[bytes, bytes]:
    """(certificate, unencrypted PKCS#8 key) as PEM."""
    return (
        cert.public_bytes(serialization.Encoding.PEM),
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        ),
    )
