"""The key SNS-format messages are signed with, and its certificate (served at SigningCertURL and
used for the HTTPS endpoint itself).

An operator may bring a CA-issued certificate and key (SNS_CERT_FILE, SNS_KEY_FILE: the same files on
every feedback replica); otherwise postmesh makes a self-signed one for SNS_CERT_HOST and keeps it in
DATA_DIR/sns, so the certificate URL consumers cached stays valid across restarts.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from postmesh.common.certs import pem, self_signed


@dataclass(frozen=True)
class SigningIdentity:
    private_key: rsa.RSAPrivateKey
    cert_pem: bytes  # the certificate, then any chain
    cert_file: Path
    key_file: Path

    @property
    def cert_id(self) -> str:
        """Names the certificate in its URL, so a new certificate gets a new URL (consumers cache)."""
        first = x509.load_pem_x509_certificate(self.cert_pem)
        return hashlib.sha256(first.public_bytes(serialization.Encoding.DER)).hexdigest()[:32]


def load_or_create(
    *, host: str, data_dir: Path, cert_file: str = "", key_file: str = "", now: dt.datetime | None = None
) -> SigningIdentity:
    if bool(cert_file) != bool(key_file):
        raise ValueError("SNS_CERT_FILE and SNS_KEY_FILE go together: set both or neither")
    if cert_file:
        cert_path, key_path = Path(cert_file), Path(key_file)
    else:
        folder = data_dir / "sns"
        cert_path, key_path = folder / "signing-cert.pem", folder / "signing-key.pem"
        if not (cert_path.exists() and key_path.exists()):
            folder.mkdir(parents=True, exist_ok=True)
            key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
            cert_pem, key_pem = pem(*self_signed([host], key=key, ca=True, now=now))
            descriptor = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(descriptor, "wb") as out:
                out.write(key_pem)
            cert_path.write_bytes(cert_pem)
    private_key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    if not isinstance(private_key, rsa.RSAPrivateKey):
        raise ValueError(f"{key_path}: SNS signatures need an RSA key")
    cert_pem = cert_path.read_bytes()
    cert = x509.load_pem_x509_certificate(cert_pem)
    public = cert.public_key()
    if not isinstance(public, rsa.RSAPublicKey) or (
        public.public_numbers() != private_key.public_key().public_numbers()
    ):
        raise ValueError(f"{cert_path} is not the certificate of {key_path}")
    return SigningIdentity(private_key, cert_pem, cert_path, key_path)
