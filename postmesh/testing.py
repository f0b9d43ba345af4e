"""Running a real mesh inside a test or benchmark process: real gRPC on a loopback port, real NATS,
real databases. The mesh runs on its own event loop in a thread, so callers may use the blocking SDK.
"""

from __future__ import annotations

import asyncio
import base64
import secrets
import threading
from collections.abc import Coroutine, Sequence
from concurrent.futures import Future
from pathlib import Path
from typing import Any, TypeVar

from postmesh.client import Client
from postmesh.common import eventloop
from postmesh.common.config import load_settings
from postmesh.common.server import MeshServer, load_all_service_settings
from postmesh.common.service import Clock
from postmesh.identity.v1 import identity_pb2

T = TypeVar("T")

# For a real `postmesh serve` process in a test or the bench: every listener besides gRPC on a port of
# its own (the defaults are fixed ports, for `make run`), and no DNS lookup leaving the machine.
LOOPBACK_PROCESS_ENV = {
    "IDENTITY_HTTP_LISTEN": "127.0.0.1:0",
    "HTTP_API_LISTEN": "127.0.0.1:0",
    "TRACKING_HTTP_LISTEN": "127.0.0.1:0",
    "SNS_HTTPS_LISTEN": "127.0.0.1:0",
    "INBOUND_SMTP_LISTEN": "127.0.0.1:0",
    "DNS_RESOLVER": "127.0.0.1:9",
}


class MeshThread:
    def __init__(
        self,
        *,
        nats_url: str,
        data_dir: Path,
        services: Sequence[str] = ("all",),
        clock: Clock | None = None,
        **settings: Any,
    ) -> None:
        load_all_service_settings()
        self.admin_key = settings.pop("admin_api_key", None) or secrets.token_urlsafe(24)
        self.service_key = settings.pop("service_api_key", None) or secrets.token_urlsafe(24)
        # Identity refuses to start without a DKIM master key; its HTTP port must not collide.
        settings.setdefault(
            "dkim_master_keys", f"test:{base64.urlsafe_b64encode(secrets.token_bytes(32)).decode()}"
        )
        settings.setdefault("identity_http_listen", "127.0.0.1:0")
        settings.setdefault("tracking_http_listen", "127.0.0.1:0")
        # The SNS endpoint makes an RSA key: only tests that want it turn it on.
        settings.setdefault("sns_https_listen", "")
        # Bounce addresses carry a tag under this key (see postmesh.common.verp).
        settings.setdefault("verp_secret", secrets.token_urlsafe(24))
        # The feedback service's inbound SMTP listener, on a port of its own per mesh.
        settings.setdefault("inbound_smtp_listen", "127.0.0.1:0")
        # Email feedback forwarding (SES: on) would queue a notice to the sender for every bounce; a
        # test that wants it turns it on, others keep counting exactly the mail they sent.
        settings.setdefault("feedback_forwarding_default", False)
        # Tests never reach a real resolver: nothing answers on the discard port.
        settings.setdefault("dns_resolver", "127.0.0.1:9")
        # Delivery workers take every message off the outbound work queue: a test that wants
        # delivery turns them on (delivery_workers=N), others may read the queue themselves.
        settings.setdefault("delivery_workers", 0)
        # Reputation is judged within a test's patience, not every few seconds.
        settings.setdefault("reputation_evaluation_seconds", 0.1)
        self.settings = load_settings(
            {},
            grpc_listen=settings.pop("grpc_listen", "127.0.0.1:0"),
            metrics_port=0,
            data_dir=str(data_dir),
            nats_url=nats_url,
            admin_api_key=self.admin_key,
            service_api_key=self.service_key,
            startup_retry_max_seconds=1.0,
            shutdown_grace_seconds=2.0,
            **settings,
        )
        self.services = services
        self.clock = clock
        self.loop = eventloop.new_event_loop(self.settings.event_loop)
        self._thread = threading.Thread(target=self.loop.run_forever, name="mesh", daemon=True)
        self.server: MeshServer | None = None

    @property
    def loop_thread_id(self) -> int:
        """The operating system's id of the thread running the mesh's event loop (once started)."""
        if self._thread.native_id is None:
            raise RuntimeError("the mesh is not started")
        return self._thread.native_id

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 60.0) -> T:
        """Runs a coroutine on the mesh's loop and waits for it."""
        future: Future[T] = asyncio.run_coroutine_threadsafe(coro, self.loop)
        return future.result(timeout)

    def start(self, *, wait_ready: bool = True, timeout: float = 60.0) -> MeshThread:
        self._thread.start()

        async def boot() -> MeshServer:
            server = MeshServer(self.settings, self.services, clock=self.clock)
            await server.start()
            return server

        self.server = self.run(boot())
        if wait_ready:
            self.run(self.server.wait_ready(), timeout)
        return self

    @property
    def address(self) -> str:
        assert self.server is not None
        return self.server.address

    def client(self, api_key: str = "") -> Client:
        settings = self.settings
        if not settings.grpc_tls_cert_file:
            return Client(self.address, api_key)
        # A mesh serving TLS is reached with its own CA, and with its own certificate as the client
        # certificate when it requires one (mutual TLS).
        mutual = bool(settings.grpc_tls_client_ca_file)
        return Client(
            self.address,
            api_key,
            tls=True,
            ca_file=settings.grpc_tls_ca_file,
            server_name=settings.grpc_tls_server_name,
            cert_file=settings.grpc_tls_cert_file if mutual else "",
            key_file=settings.grpc_tls_key_file if mutual else "",
        )

    def admin(self) -> Client:
        return self.client(self.admin_key)

    def create_account(self, name: str = "test account") -> tuple[str, str]:
        """A new account: (account id, API key)."""
        with self.admin() as admin:
            reply = admin.identity.CreateAccount(identity_pb2.CreateAccountRequest(name=name))
        return reply.account.account_id, reply.api_key_secret

    def stop(self) -> None:
        if not self._thread.is_alive():
            return
        if self.server is not None:
            self.run(self.server.stop(grace=2.0))
            self.server = None

        async def cancel_leftovers() -> None:
            # nats-py leaves subscription tasks behind after drain(); end them before the loop closes.
            current = asyncio.current_task()
            leftovers = [t for t in asyncio.all_tasks() if t is not current]
            for task in leftovers:
                task.cancel()
            await asyncio.gather(*leftovers, return_exceptions=True)

        self.run(cancel_leftovers())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        if not self.loop.is_running():
            self.loop.close()

    def __enter__(self) -> MeshThread:
        return self.start()

    def __exit__(self, *_: object) -> None:
        self.stop()
