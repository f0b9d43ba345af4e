"""The SMTP server's TLS: certificate and key from files, reloaded in place when they change, and a
self-signed pair for `postmesh dev`."""

from __future__ import annotations

import asyncio
import logging
import os
import ssl
from pathlib import Path

from postmesh.common.certs import pem, self_signed

log = logging.getLogger(__name__)


class ReloadingTls:
    """One server SSLContext for every listener. Loading a new chain into the same context changes the
    certificate of every later handshake; connections already up keep theirs."""

    def __init__(self, cert_file: str, key_file: str) -> None:
        if not cert_file or not key_file:
            raise ValueError("SMTP_TLS_CERT_FILE and SMTP_TLS_KEY_FILE must be set to serve SMTP")
        self.cert_file = cert_file
        self.key_file = key_file
        self.context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self.context.minimum_version = ssl.TLSVersion.TLSv1_2
        self._stamp = self._files_stamp()
        self.context.load_cert_chain(cert_file, key_file)

    def _files_stamp(self) -> tuple[float, float, int, int]:
        cert, key = os.stat(self.cert_file), os.stat(self.key_file)
        return cert.st_mtime, key.st_mtime, cert.st_size, key.st_size

    def reload_if_changed(self) -> bool:
        try:
            stamp = self._files_stamp()
            if stamp == self._stamp:
                return False
            # Checked on a context of its own first: a pair that does not load (a key that does not
            # match yet) must not reach the live context.
            ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(self.cert_file, self.key_file)
            self.context.load_cert_chain(self.cert_file, self.key_file)
        except (OSError, ssl.SSLError) as exc:
            # Half-written files (a renewal in progress): keep serving the old pair, try again later.
            log.warning("SMTP certificate not reloaded", extra={"error": repr(exc)})
            return False
        self._stamp = stamp
        log.info("SMTP certificate reloaded", extra={"cert": self.cert_file})
        return True

    async def watch(self, interval: float) -> None:
        while True:
            await asyncio.sleep(interval)
            self.reload_if_changed()


def write_self_signed(cert_file: Path, key_file: Path, hostname: str = "localhost") -> None:
    """A self-signed certificate for `postmesh dev` (clients must not verify it, or trust it)."""
    cert_pem, key_pem = pem(*self_signed([hostname, "127.0.0.1"], days=825))
    key_file.parent.mkdir(parents=True, exist_ok=True)
    key_file.write_bytes(key_pem)
    key_file.chmod(0o600)
    cert_file.write_bytes(cert_pem)
