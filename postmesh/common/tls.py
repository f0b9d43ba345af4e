"""TLS for gRPC: server credentials that pick up a renewed certificate without a restart, and the
channel credentials clients use to check the server (and present their own certificate for mutual TLS).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any

import grpc

log = logging.getLogger(__name__)


def _read(path: str) -> bytes:
    with open(path, "rb") as handle:
        return handle.read()


@dataclass(frozen=True)
class ServerTlsFiles:
    cert_file: str
    key_file: str
    # Set: clients must present a certificate signed by this CA (mutual TLS).
    client_ca_file: str = ""

    def _stamp(self) -> tuple[float, ...]:
        paths = [self.cert_file, self.key_file] + ([self.client_ca_file] if self.client_ca_file else [])
        return tuple(os.stat(p).st_mtime_ns for p in paths)

    def _configuration(self) -> grpc.ServerCertificateConfiguration:
        return grpc.ssl_server_certificate_configuration(
            [(_read(self.key_file), _read(self.cert_file))],
            root_certificates=_read(self.client_ca_file) if self.client_ca_file else None,
        )

    def credentials(self) -> grpc.ServerCredentials:
        """Credentials that re-read the files when they change (cert-manager renewals, a rotated
        Secret): each new connection's handshake asks for the current configuration."""
        loaded = [self._stamp()]

        def fetch() -> grpc.ServerCertificateConfiguration | None:
            try:
                stamp = self._stamp()
                if stamp == loaded[0]:
                    return None
                configuration = self._configuration()
            except (OSError, ValueError):
                # A renewal caught half-written: keep serving with the certificate in hand.
                log.warning("TLS certificate files unreadable; keeping the current certificate")
                return None
            loaded[0] = stamp
            log.info("TLS certificate reloaded", extra={"cert_file": self.cert_file})
            return configuration

        return grpc.dynamic_ssl_server_credentials(
            self._configuration(),
            fetch,  # type: ignore[arg-type]  # None means "no change", as grpc documents; its stub disagrees
            require_client_authentication=bool(self.client_ca_file),
        )


def channel_credentials(
    ca_file: str = "", cert_file: str = "", key_file: str = ""
) -> grpc.ChannelCredentials:
    """Checks the server against `ca_file` (empty: the system's roots); presents `cert_file`/`key_file`
    when both are given, for servers that require mutual TLS."""
    return grpc.ssl_channel_credentials(
        root_certificates=_read(ca_file) if ca_file else None,
        private_key=_read(key_file) if cert_file and key_file else None,
        certificate_chain=_read(cert_file) if cert_file and key_file else None,
    )


def target_name_options(server_name: str) -> list[tuple[str, str]]:
    """Channel options that check the server's certificate for `server_name` instead of the host
    dialled (a pod IP, 127.0.0.1, a headless Service name)."""
    return [("grpc.ssl_target_name_override", server_name)] if server_name else []


def mesh_client_tls(
    ca_file: str, server_name: str, cert_file: str = "", key_file: str = ""
) -> dict[str, Any]:
    """MeshClients' keyword arguments for calls to the services: TLS when a CA is given or this process
    has a certificate of its own (presented for mutual TLS); none otherwise."""
    if not ca_file and not cert_file:
        return {}
    return {"credentials": channel_credentials(ca_file, cert_file, key_file), "server_name": server_name}
