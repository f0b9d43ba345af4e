"""The gRPC server bootstrap every postmesh process uses: `postmesh serve all|identity|...`.

One process hosts any subset of the four services on one port, with the standard health service
(each service NOT_SERVING until its database and NATS are reachable), server reflection, one
interceptor for auth, errors, metrics and logs, Prometheus metrics, and graceful shutdown.
"""

from __future__ import annotations

import asyncio
import importlib
import logging
import random
import secrets
import signal
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import grpc
import nats.errors
from google.rpc import error_details_pb2, status_pb2
from grpc import aio
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from nats.aio.client import Client as NATS
from prometheus_client import Counter, Histogram, start_http_server

from postmesh.common import db
from postmesh.common.auth import Access, Authenticator, Principal, PrincipalKind, principal_var
from postmesh.common.bus import EventPublisher, connect_nats, ensure_streams
from postmesh.common.clients import MeshClients
from postmesh.common.config import SERVICE_NAMES, Settings
from postmesh.common.errors import ERROR_DOMAIN, PostmeshError, Unauthenticated
from postmesh.common.logging import request_id_var
from postmesh.common.service import Clock, Runtime, Service, SystemClock
from postmesh.common.streams import API_KEY_REVOKED_SUBJECT
from postmesh.events.v1 import events_pb2
from postmesh.identity.v1 import identity_pb2

log = logging.getLogger(__name__)

SERVICE_MODULES = {name: f"services.{name}.service" for name in SERVICE_NAMES}

# gRPC's 4 MB default would refuse raw messages SES accepts (up to 40 MB); some room for the envelope.
MAX_REQUEST_BYTES = 48 * 1024 * 1024

RPC_COUNT = Counter("postmesh_grpc_requests_total", "gRPC calls handled", ["method", "code"])
RPC_SECONDS = Histogram("postmesh_grpc_request_seconds", "gRPC call latency", ["method"])


def service_class(name: str) -> type[Service]:
    module = importlib.import_module(SERVICE_MODULES[name])
    cls: type[Service] = module.SERVICE
    return cls


# Servable units that are not gRPC services but register settings (the HTTP gateway).
EXTRA_SETTINGS_MODULES = ("services.gateway.settings",)


def load_all_service_settings() -> None:
    """Imports every service so the settings it registers are part of the schema."""
    for name in SERVICE_NAMES:
        service_class(name)
    for module in EXTRA_SETTINGS_MODULES:
        importlib.import_module(module)


def resolve_service_names(names: Sequence[str]) -> list[str]:
    if not names or "all" in names:
        return list(SERVICE_NAMES)
    unknown = [n for n in names if n not in SERVICE_NAMES]
    if unknown:
        raise ValueError(f"unknown service(s) {unknown}; choose from {', '.join(SERVICE_NAMES)} or all")
    return list(dict.fromkeys(names))


def _status_for(exc: PostmeshError) -> tuple[grpc.StatusCode, tuple[tuple[str, bytes], ...]]:
    code = getattr(grpc.StatusCode, exc.code.value)
    info = error_details_pb2.ErrorInfo(reason=exc.reason, domain=ERROR_DOMAIN, metadata=exc.metadata)
    status = status_pb2.Status(code=code.value[0], message=exc.message)
    status.details.add().Pack(info)
    if exc.retry_after_seconds is not None:
        retry = error_details_pb2.RetryInfo()
        retry.retry_delay.FromMilliseconds(int(exc.retry_after_seconds * 1000))
        status.details.add().Pack(retry)
    return code, (("grpc-status-details-bin", status.SerializeToString()),)


class MeshInterceptor(aio.ServerInterceptor):
    """Authenticates, scopes, times and logs every postmesh RPC, and maps domain errors to statuses."""

    def __init__(self, services: dict[str, Service], authenticator: Authenticator) -> None:
        self._services = services  # by full gRPC service name
        self._authenticator = authenticator

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any] | None]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        handler = await continuation(handler_call_details)
        full_method: str = handler_call_details.method
        service_name, _, method = full_method.lstrip("/").rpartition("/")
        service = self._services.get(service_name)
        if handler is None or service is None or handler.unary_unary is None:
            return handler  # health, reflection: no postmesh policy applies
        access = service.access_for(method)
        internal = access is Access.INTERNAL
        behaviour = handler.unary_unary

        async def wrapped(request: Any, context: aio.ServicerContext) -> Any:
            metadata = {
                key: value for key, value in (context.invocation_metadata() or ()) if isinstance(value, str)
            }
            request_id_var.set(metadata.get("x-request-id") or f"{random.getrandbits(64):016x}")
            started = time.perf_counter()
            code = grpc.StatusCode.OK
            try:
                if not service.runtime.ready.is_set():
                    code = grpc.StatusCode.UNAVAILABLE
                    await context.abort(code, f"The {service.name} service is starting; try again shortly.")
                principal = await self._authenticator.authenticate(metadata, access)
                principal_var.set(principal)
                return await behaviour(request, context)  # type: ignore[arg-type]
            except PostmeshError as exc:
                code, trailers = _status_for(exc)
                await context.abort(code, exc.message, trailing_metadata=trailers)
            except aio.AbortError:
                code = context.code() or code
                raise
            except Exception:
                code = grpc.StatusCode.INTERNAL
                log.exception("unhandled error", extra={"method": full_method})
                await context.abort(code, "Internal failure; the request id is in the server log.")
            finally:
                elapsed = time.perf_counter() - started
                RPC_COUNT.labels(full_method, code.name).inc()
                RPC_SECONDS.labels(full_method).observe(elapsed)
                # Calls between services (several per message sent) only at DEBUG unless they fail;
                # the call that started them is logged at INFO.
                level = logging.DEBUG if internal and code is grpc.StatusCode.OK else logging.INFO
                if log.isEnabledFor(level):
                    log.log(
                        level,
                        "rpc",
                        extra={"method": full_method, "code": code.name, "ms": round(elapsed * 1000, 2)},
                    )

        return grpc.unary_unary_rpc_method_handler(
            wrapped,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )


def _connect_address(listen: str, port: int) -> str:
    host = listen.rpartition(":")[0] or "127.0.0.1"
    if host in ("0.0.0.0", "[::]", "::", ""):
        host = "127.0.0.1"
    return f"{host}:{port}"


class MeshServer:
    """One process hosting some of the services. start() returns at once with health NOT_SERVING;
    each service turns SERVING when its database and NATS are ready."""

    def __init__(
        self, settings: Settings, service_names: Sequence[str], *, clock: Clock | None = None
    ) -> None:
        self.settings = settings
        self.names = resolve_service_names(service_names)
        self.clock = clock or SystemClock()
        service_key = settings.service_api_key
        if not service_key:
            if set(self.names) != set(SERVICE_NAMES):
                raise ValueError("SERVICE_API_KEY must be set when the services run in separate processes")
            # All four services share this process: a per-process secret is enough for them.
            service_key = secrets.token_urlsafe(32)
        self.service_key = service_key
        self.health = health.aio.HealthServicer()
        self.port = 0
        self.services: dict[str, Service] = {}
        self.nats: NATS | None = None
        self._startup: asyncio.Task[None] | None = None
        self._stopped = asyncio.Event()

    @property
    def address(self) -> str:
        return _connect_address(self.settings.grpc_listen, self.port)

    def _endpoints(self) -> dict[str, str]:
        # A service this process hosts is reached on this process's own port, still through gRPC.
        return {name: self.settings.get(f"{name.upper()}_ENDPOINT") or self.address for name in SERVICE_NAMES}

    async def _lookup_api_key(self, api_key: str) -> Principal:
        try:
            reply = await self.clients.identity.AuthenticateApiKey(
                identity_pb2.AuthenticateApiKeyRequest(api_key=api_key), timeout=10
            )
        except aio.AioRpcError as exc:
            if exc.code() in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.NOT_FOUND):
                raise Unauthenticated("The API key is not valid.", reason="INVALID_API_KEY") from exc
            raise
        return Principal(PrincipalKind.ACCOUNT, account_id=reply.account_id, key_id=reply.key_id)

    async def start(self) -> int:
        self.authenticator = Authenticator(
            admin_key=self.settings.admin_api_key,
            service_key=self.service_key,
            lookup=self._lookup_api_key,
            cache_seconds=self.settings.auth_cache_seconds,
        )
        by_full_name: dict[str, Service] = {}
        self.server = aio.server(
            interceptors=[MeshInterceptor(by_full_name, self.authenticator)],
            options=[("grpc.max_receive_message_length", MAX_REQUEST_BYTES)],
        )
        self.port = self.server.add_insecure_port(self.settings.grpc_listen)
        if self.port == 0:
            raise OSError(f"cannot listen on {self.settings.grpc_listen}")
        self.clients = MeshClients(self._endpoints(), self.service_key)

        for name in self.names:
            runtime = Runtime(
                name=name,
                settings=self.settings,
                clients=self.clients,
                authenticator=self.authenticator,
                clock=self.clock,
            )
            service = service_class(name)(runtime)
            service.register(self.server)
            self.services[name] = service
            by_full_name[service.full_name] = service

        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        full_names = [s.full_name for s in self.services.values()]
        reflection.enable_server_reflection(
            [*full_names, health.SERVICE_NAME, reflection.SERVICE_NAME], self.server
        )
        for full_name in ["", *full_names]:
            await self.health.set(full_name, health_pb2.HealthCheckResponse.NOT_SERVING)

        if self.settings.metrics_port:
            start_http_server(
                self.settings.metrics_port, addr=self.settings.grpc_listen.rpartition(":")[0] or ""
            )
        await self.server.start()
        log.info("listening", extra={"address": self.address, "services": ",".join(self.names)})
        self._startup = asyncio.create_task(self._bring_up(), name="startup")
        return self.port

    async def _bring_up(self) -> None:
        max_delay = self.settings.startup_retry_max_seconds
        nats_url = self.settings.nats_url
        if not nats_url:
            raise ValueError("NATS_URL is not set")
        self.nats = await connect_nats(nats_url, max_delay=max_delay, name=f"postmesh-{'-'.join(self.names)}")
        js = self.nats.jetstream()
        await ensure_streams(js, replicas=self.settings.nats_stream_replicas)
        publisher = EventPublisher(js)

        async def on_key_revoked(msg: Any) -> None:
            event = events_pb2.Event.FromString(msg.data)
            self.authenticator.forget_key(event.api_key_revoked.key_id)

        # Core subscription: every replica sees every revocation (a JetStream publish is also a core message).
        await self.nats.subscribe(API_KEY_REVOKED_SUBJECT, cb=on_key_revoked)
        await asyncio.gather(*(self._bring_up_service(s, js, publisher) for s in self.services.values()))
        await self.health.set("", health_pb2.HealthCheckResponse.SERVING)
        log.info("all services serving", extra={"services": ",".join(self.names)})

    async def _bring_up_service(self, service: Service, js: Any, publisher: EventPublisher) -> None:
        runtime = service.runtime
        runtime.nats, runtime.js, runtime._events = self.nats, js, publisher
        if service.metadata is not None and service.migrations_dir is not None:
            engine = db.create_engine(self.settings.database_url(service.name))
            await db.connect_with_retry(engine, max_delay=self.settings.startup_retry_max_seconds)
            await db.migrate(
                engine, service.migrations_dir, f"alembic_version_{service.name}", service.metadata
            )
            runtime.engine = engine
            runtime._sessions = db.session_factory(engine)
        await service.on_ready()
        runtime.ready.set()
        await self.health.set(service.full_name, health_pb2.HealthCheckResponse.SERVING)
        log.info("service serving", extra={"service": service.name})

    async def wait_ready(self) -> None:
        """Returns once every hosted service is SERVING (wrap in asyncio.timeout to bound it)."""
        assert self._startup is not None, "start() first"
        await asyncio.shield(self._startup)

    async def stop(self, grace: float | None = None) -> None:
        """Stops accepting calls, lets in-flight ones finish (up to `grace` seconds), then closes."""
        grace = self.settings.shutdown_grace_seconds if grace is None else grace
        await self.health.enter_graceful_shutdown()
        log.debug("stopping gRPC server", extra={"grace": grace})
        await self.server.stop(grace)
        if self._startup and not self._startup.done():
            self._startup.cancel()
        for service in self.services.values():
            log.debug("stopping service", extra={"service": service.name})
            for task in service.runtime.tasks:
                task.cancel()
            if service.runtime.tasks:
                # A task that ignores its cancellation must not hold the shutdown forever.
                _, stuck = await asyncio.wait(service.runtime.tasks, timeout=max(grace, 1.0) + 5.0)
                for task in stuck:
                    log.error("background task did not stop", extra={"task": task.get_name()})
            await service.on_stop()
            if service.runtime.engine is not None:
                await service.runtime.engine.dispose()
        await self.clients.close()
        if self.nats is not None and not self.nats.is_closed:
            log.debug("draining NATS")
            try:
                # Drain flushes what was published; it can wait forever on a server that is gone.
                async with asyncio.timeout(5):
                    await self.nats.drain()
            except (TimeoutError, nats.errors.Error):
                await self.nats.close()
        self._stopped.set()
        log.info("stopped")

    async def serve_until_signalled(self) -> None:
        """Runs until SIGTERM or SIGINT, then shuts down gracefully."""
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await self.start()
        startup = self._startup
        assert startup is not None
        waiter = asyncio.create_task(stop.wait())
        done, _ = await asyncio.wait({startup, waiter}, return_when=asyncio.FIRST_COMPLETED)
        if startup in done and startup.exception() is not None:
            # Unreachable NATS or databases are retried inside start-up; anything else is a fault that
            # a restart (by Kubernetes, or the operator) should surface.
            log.error("start-up failed", exc_info=startup.exception())
            waiter.cancel()
            await self.stop(grace=1.0)
            raise SystemExit(1)
        await waiter
        log.info("shutting down")
        await self.stop()


__all__ = ["Access", "MeshServer", "resolve_service_names", "service_class"]
