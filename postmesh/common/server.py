"""The gRPC server bootstrap every postmesh process uses: `postmesh serve all|identity|...`.

One process hosts any subset of the four services on one port, with the standard health service
(each service NOT_SERVING until its database and NATS are reachable), server reflection, one
interceptor for auth, errors, metrics and logs, Prometheus metrics, and graceful shutdown.
"""

from __future__ import annotations

import asyncio
import functools
import importlib
import logging
import random
import secrets
import signal
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any

import grpc
import nats.errors
from google.protobuf import descriptor_pool
from google.protobuf.descriptor import Descriptor
from google.protobuf.message import DecodeError, Message
from google.rpc import error_details_pb2, status_pb2
from grpc import aio
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from nats.aio.client import Client as NATS
from opentelemetry.trace import SpanKind
from prometheus_client import Counter, Gauge, Histogram, start_http_server

from postmesh.client import error_details
from postmesh.common import db, eventloop, tracing
from postmesh.common.auth import Access, Authenticator, Principal, PrincipalKind, principal_var
from postmesh.common.bus import EventPublisher, connect_nats, ensure_streams
from postmesh.common.clients import MeshClients, domain_error_from
from postmesh.common.config import SERVICE_NAMES, UNIT_NAMES, Settings
from postmesh.common.errors import ERROR_DOMAIN, InvalidArgument, PostmeshError, Unauthenticated, Unavailable
from postmesh.common.logging import REQUEST_ID_HEADER, request_id_var
from postmesh.common.metrics import REFUSALS, collect_jetstream_forever
from postmesh.common.service import Clock, Runtime, Service, SystemClock
from postmesh.common.streams import API_KEY_REVOKED_SUBJECT
from postmesh.common.tls import ServerTlsFiles, mesh_client_tls
from postmesh.common.workers import WorkerRole
from postmesh.events.v1 import events_pb2
from postmesh.identity.v1 import identity_pb2

log = logging.getLogger(__name__)

# `all` includes every unit (postmesh.common.config.UNIT_NAMES), the SMTP submission server too.
SERVICE_MODULES = {name: f"services.{name}.service" for name in SERVICE_NAMES}
SERVICE_MODULES["smtp"] = "services.sender.smtp.service"


# gRPC's 4 MB default would refuse raw messages SES accepts (up to 40 MB); some room for the envelope.
MAX_REQUEST_BYTES = 48 * 1024 * 1024
# What gRPC itself accepts sits above that, so a request a little too large hears postmesh's own
# INVALID_ARGUMENT MESSAGE_REJECTED instead of gRPC's RESOURCE_EXHAUSTED (which clients retry).
GRPC_RECEIVE_LIMIT_BYTES = 64 * 1024 * 1024
# An error message repeats at most this much of a caller's input: gRPC's metadata limit (8 KiB by
# default) would otherwise replace the whole answer with RESOURCE_EXHAUSTED.
MAX_ERROR_MESSAGE_CHARS = 1024
MAX_ERROR_METADATA_CHARS = 256

RPC_COUNT = Counter("postmesh_grpc_requests_total", "gRPC calls handled", ["method", "code"])
RPC_SECONDS = Histogram("postmesh_grpc_request_seconds", "gRPC call latency", ["method"])
# Per process, so that each worker of `serve all` (its own metrics port) says whether it serves.
SERVING = Gauge(
    "postmesh_serving",
    "1 while this process reports the service SERVING (service empty: the whole process)",
    ["service"],
)


def service_class(name: str) -> type[Service]:
    module = importlib.import_module(SERVICE_MODULES[name])
    cls: type[Service] = module.SERVICE
    return cls


# Servable units that are not gRPC services but register settings (the HTTP gateway).
EXTRA_SETTINGS_MODULES = ("services.gateway.settings",)


def load_all_service_settings() -> None:
    """Imports every service so the settings it registers are part of the schema."""
    for name in UNIT_NAMES:
        service_class(name)
    for module in EXTRA_SETTINGS_MODULES:
        importlib.import_module(module)


def _is_grpc_service(full_name: str) -> bool:
    """False for units that only have a health name (the SMTP server)."""
    try:
        descriptor_pool.Default().FindServiceByName(full_name)
    except KeyError:
        return False
    return True


def resolve_service_names(names: Sequence[str]) -> list[str]:
    if not names or "all" in names:
        return list(UNIT_NAMES)
    unknown = [n for n in names if n not in UNIT_NAMES]
    if unknown:
        raise ValueError(f"unknown service(s) {unknown}; choose from {', '.join(UNIT_NAMES)} or all")
    return list(dict.fromkeys(names))


async def migrate_services(settings: Settings, names: Sequence[str]) -> list[str]:
    """Applies each named service's migrations to its database (`postmesh migrate`); returns the
    services migrated. Safe beside other processes migrating or starting (see db.migrate)."""
    done = []
    for name in resolve_service_names(names):
        cls = service_class(name)
        if cls.metadata is None or cls.migrations_dir is None:
            continue
        engine = db.create_engine(settings.database_url(name))
        try:
            await db.migrate(engine, cls.migrations_dir, f"alembic_version_{name}", cls.metadata)
        finally:
            await engine.dispose()
        done.append(name)
    return done


def _capped(text: str, limit: int) -> str:
    if len(text) <= limit:
        return text
    suffix = f"... ({len(text)} characters)"
    return text[: limit - len(suffix)] + suffix


def _status_for(exc: PostmeshError) -> tuple[grpc.StatusCode, str, tuple[tuple[str, bytes], ...]]:
    code = getattr(grpc.StatusCode, exc.code.value)
    message = _capped(exc.message, MAX_ERROR_MESSAGE_CHARS)
    metadata = {k: _capped(v, MAX_ERROR_METADATA_CHARS) for k, v in exc.metadata.items()}
    info = error_details_pb2.ErrorInfo(reason=exc.reason, domain=ERROR_DOMAIN, metadata=metadata)
    status = status_pb2.Status(code=code.value[0], message=message)
    status.details.add().Pack(info)
    if exc.retry_after_seconds is not None:
        retry = error_details_pb2.RetryInfo()
        retry.retry_delay.FromMilliseconds(int(exc.retry_after_seconds * 1000))
        status.details.add().Pack(retry)
    return code, message, (("grpc-status-details-bin", status.SerializeToString()),)


class _Undecodable:
    """What the request deserializer hands over in place of a request it could not decode, so the
    interceptor answers INVALID_ARGUMENT (gRPC itself would answer UNKNOWN before postmesh saw it)."""

    def __init__(self, error: InvalidArgument) -> None:
        self.error = error


def _tolerant(deserializer: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    if deserializer is None:
        return None

    def decode(data: bytes) -> Any:
        if len(data) > MAX_REQUEST_BYTES:
            return _Undecodable(
                InvalidArgument(
                    f"The request is {len(data)} bytes long: more than {MAX_REQUEST_BYTES} bytes.",
                    reason="MESSAGE_REJECTED",
                )
            )
        try:
            request = deserializer(data)
        except DecodeError as exc:
            if "UTF-8" in str(exc):
                text = "A string field of the request is not valid UTF-8 (protobuf strings must be)."
            else:
                text = "The request is not a valid protobuf message of its method's request type."
            return _Undecodable(InvalidArgument(text))
        unknown = _unknown_enum_value(request)
        if unknown is not None:
            return _Undecodable(unknown)
        return request

    return decode


def _unknown_enum_value(message: Message, prefix: str = "") -> InvalidArgument | None:
    """Proto3 keeps an enum number it does not know; domain code would fail on its name, so the
    request is refused here, naming the field."""
    for field, value in message.ListFields():
        name = f"{prefix}{field.name}"
        values = value if field.is_repeated else [value]
        enum, child_type = field.enum_type, field.message_type
        if enum is not None:
            for number in values:
                if enum.values_by_number.get(number) is None:
                    return InvalidArgument(f"{number} is not a valid value of {enum.name}.", field=name)
        elif child_type is not None and not child_type.GetOptions().map_entry and _may_hold_enums(child_type):
            for child in values:
                found = _unknown_enum_value(child, f"{name}.")
                if found is not None:
                    return found
    return None


@functools.cache
def _may_hold_enums(message_type: Descriptor) -> bool:
    """Whether a message of this type can hold an enum field at any depth (most parts of a request,
    a body or a destination, cannot: no need to walk them)."""
    seen, waiting = set(), [message_type]
    while waiting:
        current = waiting.pop()
        if current.full_name in seen:
            continue
        seen.add(current.full_name)
        for field in current.fields:
            if field.enum_type is not None:
                return True
            if field.message_type is not None:
                waiting.append(field.message_type)
    return False


DATABASE_RETRY_SECONDS = 2.0
QUEUE_RETRY_SECONDS = 1.0


_DATABASE_PROBE_FAILED = Unavailable("The database did not answer a probe.", reason="DATABASE_UNAVAILABLE")


def outage_error(exc: BaseException) -> PostmeshError | None:
    """What a caller should hear when `exc` means a dependency is out (retryable), else None."""
    if isinstance(exc, aio.AioRpcError):
        # Another service's answer (its own outage, or a refusal): passed on as it was given.
        return domain_error_from(exc)
    if db.unreachable(exc):
        return Unavailable(
            "The database is unreachable; retry with backoff (a send retried with the same "
            "request_id is never sent twice).",
            reason="DATABASE_UNAVAILABLE",
            retry_after_seconds=DATABASE_RETRY_SECONDS,
        )
    if isinstance(exc, nats.errors.Error):
        return Unavailable(
            "The message bus (NATS) is unreachable; retry with backoff.",
            reason="QUEUE_UNAVAILABLE",
            retry_after_seconds=QUEUE_RETRY_SECONDS,
        )
    return None


class MeshInterceptor(aio.ServerInterceptor):
    """Authenticates, scopes, times and logs every postmesh RPC, and maps domain errors to statuses."""

    def __init__(
        self,
        services: dict[str, Service],
        authenticator: Authenticator,
        on_outage: Callable[[Service, PostmeshError], None] | None = None,
    ) -> None:
        self._services = services  # by full gRPC service name
        self._authenticator = authenticator
        self._on_outage = on_outage
        # By method: the handler gRPC found and the one given in its place. gRPC asks for a handler on
        # every call, and finds the same one each time: its policy wrapper is made once, not per call.
        self._wrapped: dict[str, tuple[grpc.RpcMethodHandler[Any, Any], grpc.RpcMethodHandler[Any, Any]]] = {}

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any] | None]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        handler = await continuation(handler_call_details)
        if handler is None:
            return None  # an unknown method (not kept: its name is the caller's)
        full_method: str = handler_call_details.method
        kept = self._wrapped.get(full_method)
        if kept is not None and kept[0] is handler:
            return kept[1]
        wrapped = self._with_policy(handler, full_method)
        if wrapped is not handler:  # only postmesh's policy is kept (not a bare handler: health...)
            self._wrapped[full_method] = (handler, wrapped)
        return wrapped

    def _with_policy(
        self, handler: grpc.RpcMethodHandler[Any, Any], full_method: str
    ) -> grpc.RpcMethodHandler[Any, Any]:
        service_name, _, method = full_method.lstrip("/").rpartition("/")
        service = self._services.get(service_name)
        if service is None:
            return handler  # health, reflection: no postmesh policy applies
        if handler.stream_stream is not None:
            return self._stream_handler(service, handler, full_method, service.access_for(method))
        if handler.unary_unary is None:
            return handler
        access = service.access_for(method)
        internal = access is Access.INTERNAL
        behaviour = handler.unary_unary
        seconds = RPC_SECONDS.labels(full_method)
        counts: dict[grpc.StatusCode, Any] = {}  # RPC_COUNT's child by status, as calls end with it

        async def wrapped(request: Any, context: aio.ServicerContext) -> Any:
            metadata = {
                key: value for key, value in (context.invocation_metadata() or ()) if isinstance(value, str)
            }
            if not tracing.enabled():
                return await observed(request, context, metadata)
            # A child of the caller's span when it sent a traceparent (another service, an SDK).
            with tracing.span(
                full_method,
                kind=SpanKind.SERVER,
                parent_carrier=metadata,
                attributes={"rpc.system": "grpc", "rpc.service": service_name, "rpc.method": method},
            ):
                return await observed(request, context, metadata)

        async def observed(request: Any, context: aio.ServicerContext, metadata: dict[str, str]) -> Any:
            given = metadata.get(REQUEST_ID_HEADER, "")[:128]
            request_id_var.set(given or f"{random.getrandbits(64):016x}")
            started = time.perf_counter()
            code = grpc.StatusCode.OK
            try:
                if not service.runtime.ready.is_set():
                    code = grpc.StatusCode.UNAVAILABLE
                    await context.abort(code, f"The {service.name} service is starting; try again shortly.")
                principal = await self._authenticator.authenticate(metadata, access)
                principal_var.set(principal)
                if isinstance(request, _Undecodable):
                    raise request.error
                # Not cancelled midway when the caller goes away (see run_to_the_end).
                return await eventloop.run_to_the_end(behaviour(request, context))  # type: ignore[arg-type]
            except PostmeshError as exc:
                REFUSALS.labels(full_method, exc.reason).inc()
                code, message, trailers = _status_for(exc)
                await context.abort(code, message, trailing_metadata=trailers)
            except aio.AbortError:
                code = context.code() or code
                raise
            except Exception as exc:
                outage = outage_error(exc)
                if outage is None:
                    code = grpc.StatusCode.INTERNAL
                    log.exception("unhandled error", extra={"method": full_method})
                    await context.abort(code, "Internal failure; the request id is in the server log.")
                else:
                    log.warning(
                        "dependency unavailable",
                        extra={"method": full_method, "reason": outage.reason, "error": repr(exc)},
                    )
                    if self._on_outage is not None:
                        self._on_outage(service, outage)
                    REFUSALS.labels(full_method, outage.reason).inc()
                    code, message, trailers = _status_for(outage)
                    await context.abort(code, message, trailing_metadata=trailers)
            finally:
                elapsed = time.perf_counter() - started
                count = counts.get(code)
                if count is None:
                    count = counts[code] = RPC_COUNT.labels(full_method, code.name)
                count.inc()
                seconds.observe(elapsed)
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
            request_deserializer=_tolerant(handler.request_deserializer),
            response_serializer=handler.response_serializer,
        )

    def _stream_handler(
        self, service: Service, handler: grpc.RpcMethodHandler[Any, Any], full_method: str, access: Access
    ) -> grpc.RpcMethodHandler[Any, Any]:
        """The same policy for a bidirectional stream: authenticated once, when it opens."""
        behaviour = handler.stream_stream
        assert behaviour is not None

        async def wrapped(requests: AsyncIterator[Any], context: aio.ServicerContext) -> AsyncIterator[Any]:
            metadata = {
                key: value for key, value in (context.invocation_metadata() or ()) if isinstance(value, str)
            }
            request_id_var.set(metadata.get("x-request-id") or f"{random.getrandbits(64):016x}")
            if not service.runtime.ready.is_set():
                await context.abort(
                    grpc.StatusCode.UNAVAILABLE, f"The {service.name} service is starting; try again shortly."
                )

            async def decoded() -> AsyncIterator[Any]:
                # A message that does not decode ends the stream with INVALID_ARGUMENT, as a unary call.
                async for request in requests:
                    if isinstance(request, _Undecodable):
                        raise request.error
                    yield request

            try:
                principal_var.set(await self._authenticator.authenticate(metadata, access))
                log.info("stream opened", extra={"method": full_method})
                async for response in behaviour(decoded(), context):  # type: ignore[arg-type, attr-defined]
                    yield response
            except PostmeshError as exc:
                code, message, trailers = _status_for(exc)
                await context.abort(code, message, trailing_metadata=trailers)

        return grpc.stream_stream_rpc_method_handler(
            wrapped,
            request_deserializer=_tolerant(handler.request_deserializer),
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
        self,
        settings: Settings,
        service_names: Sequence[str],
        *,
        clock: Clock | None = None,
        worker: WorkerRole | None = None,
    ) -> None:
        self.settings = settings
        self.worker = worker or WorkerRole()
        self.names = resolve_service_names(service_names)
        self.clock = clock or SystemClock()
        service_key = settings.service_api_key
        if not service_key:
            if not set(SERVICE_NAMES) <= set(self.names):
                raise ValueError("SERVICE_API_KEY must be set when the services run in separate processes")
            # All four services share this process: a per-process secret is enough for them.
            service_key = secrets.token_urlsafe(32)
            if not settings.values.get("VERP_SECRET"):
                # Bounce addresses need a key too (postmesh.common.verp); one that lives only as long as
                # the process leaves bounces arriving after a restart unmapped (kept): say so.
                log.warning(
                    "neither VERP_SECRET nor SERVICE_API_KEY is set: bounce addresses use a key "
                    "that changes on every start"
                )
                settings = settings.with_overrides(verp_secret=secrets.token_urlsafe(32))
                self.settings = settings
        self.service_key = service_key
        self.health = health.aio.HealthServicer()
        self.port = 0
        self.health_server: aio.Server | None = None
        self.health_port = 0
        self._collector: asyncio.Task[None] | None = None
        self.services: dict[str, Service] = {}
        self.nats: NATS | None = None
        self._startup: asyncio.Task[None] | None = None
        self._stopped = asyncio.Event()
        # Dependencies out right now: NATS (for every service), a service's database (by name).
        self._nats_down = False
        self._databases_down: set[str] = set()
        self._probes: dict[str, asyncio.Task[None]] = {}

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
                if error_details(exc).reason == "API_KEY_REVOKED":
                    raise Unauthenticated("The API key has been revoked.", reason="API_KEY_REVOKED") from exc
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
        options: list[tuple[str, Any]] = [("grpc.max_receive_message_length", GRPC_RECEIVE_LIMIT_BYTES)]
        if self.worker.shares_ports:
            options.append(("grpc.so_reuseport", 1))
        self.server = aio.server(
            interceptors=[MeshInterceptor(by_full_name, self.authenticator, self._on_outage)],
            options=options,
        )
        tls = self._server_tls()
        if self.worker.listen_when_ready:
            # The port is shared and fixed (the supervisor chose it): known before it is bound.
            self.port = int(self.settings.grpc_listen.rpartition(":")[2])
        else:
            self._add_port(tls)
        self.clients = MeshClients(self._endpoints(), self.service_key, **self._client_tls(tls))

        for name in self.names:
            runtime = Runtime(
                name=name,
                settings=self.settings,
                clients=self.clients,
                authenticator=self.authenticator,
                clock=self.clock,
                worker=self.worker,
            )
            service = service_class(name)(runtime)
            service.register(self.server)
            self.services[name] = service
            by_full_name[service.full_name] = service

        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        full_names = [s.full_name for s in self.services.values()]
        reflected = [n for n in full_names if _is_grpc_service(n)]
        reflection.enable_server_reflection(
            [*reflected, health.SERVICE_NAME, reflection.SERVICE_NAME], self.server
        )
        for full_name in ["", *full_names]:
            await self.health.set(full_name, health_pb2.HealthCheckResponse.NOT_SERVING)

        if self.settings.metrics_port:
            # Each worker process counts its own calls: worker i serves them on METRICS_PORT + i.
            start_http_server(
                self.settings.metrics_port + self.worker.index,
                addr=self.settings.grpc_listen.rpartition(":")[0] or "",
            )
        if not self.worker.listen_when_ready:
            await self._listen(tls)
        self._startup = asyncio.create_task(self._bring_up(tls), name="startup")
        return self.port

    def _add_port(self, tls: ServerTlsFiles | None) -> None:
        if tls is None:
            self.port = self.server.add_insecure_port(self.settings.grpc_listen)
        else:
            self.port = self.server.add_secure_port(self.settings.grpc_listen, tls.credentials())
        if self.port == 0:
            raise OSError(f"cannot listen on {self.settings.grpc_listen}")

    async def _listen(self, tls: ServerTlsFiles | None) -> None:
        await self.server.start()
        await self._start_health_port()
        log.info(
            "listening",
            extra={"address": self.address, "services": ",".join(self.names), "tls": tls is not None},
        )

    def _server_tls(self) -> ServerTlsFiles | None:
        cert, key = self.settings.grpc_tls_cert_file, self.settings.grpc_tls_key_file
        if bool(cert) != bool(key):
            raise ValueError("GRPC_TLS_CERT_FILE and GRPC_TLS_KEY_FILE go together")
        if not cert:
            if self.settings.grpc_tls_client_ca_file:
                raise ValueError("GRPC_TLS_CLIENT_CA_FILE needs GRPC_TLS_CERT_FILE and GRPC_TLS_KEY_FILE")
            return None
        return ServerTlsFiles(cert, key, self.settings.grpc_tls_client_ca_file)

    def _client_tls(self, tls: ServerTlsFiles | None) -> dict[str, Any]:
        """How this process calls the services: over TLS when it serves TLS itself or has a CA for the
        others, presenting its own certificate (for peers that require mutual TLS)."""
        cert, key = (tls.cert_file, tls.key_file) if tls else ("", "")
        return mesh_client_tls(self.settings.grpc_tls_ca_file, self.settings.grpc_tls_server_name, cert, key)

    async def _start_health_port(self) -> None:
        """Kubernetes' gRPC probes speak plain text only: under TLS they get a port of their own that
        serves the health service and nothing else."""
        listen = self.settings.health_listen
        if not listen:
            return
        self.health_server = aio.server()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.health_server)
        self.health_port = self.health_server.add_insecure_port(listen)
        if self.health_port == 0:
            raise OSError(f"cannot listen on {listen}")
        await self.health_server.start()

    async def _bring_up(self, tls: ServerTlsFiles | None) -> None:
        max_delay = self.settings.startup_retry_max_seconds
        nats_url = self.settings.nats_url
        if not nats_url:
            raise ValueError("NATS_URL is not set")
        self.nats = await connect_nats(
            nats_url,
            max_delay=max_delay,
            name=f"postmesh-{'-'.join(self.names)}",
            disconnected_cb=self._on_nats_disconnected,
            reconnected_cb=self._on_nats_reconnected,
        )
        js = self.nats.jetstream()
        await ensure_streams(
            js,
            replicas=self.settings.nats_stream_replicas,
            duplicate_window_seconds=self.settings.nats_duplicate_window_seconds,
        )
        publisher = EventPublisher(js)

        async def on_key_revoked(msg: Any) -> None:
            event = events_pb2.Event.FromString(msg.data)
            self.authenticator.forget_key(event.api_key_revoked.key_id)

        # Core subscription: every replica sees every revocation (a JetStream publish is also a core message).
        await self.nats.subscribe(API_KEY_REVOKED_SUBJECT, cb=on_key_revoked)
        if self.settings.metrics_port:
            self._collector = asyncio.create_task(collect_jetstream_forever(js), name="jetstream-metrics")
        await asyncio.gather(*(self._bring_up_service(s, js, publisher) for s in self.services.values()))
        if self.worker.listen_when_ready:
            self._add_port(tls)
            await self._listen(tls)
        await self._refresh_health()
        self.worker.announce_ready()
        eventloop.server_ready()
        log.info("all services serving", extra={"services": ",".join(self.names)})

    async def _bring_up_service(self, service: Service, js: Any, publisher: EventPublisher) -> None:
        runtime = service.runtime
        runtime.nats, runtime.js, runtime._events = self.nats, js, publisher
        runtime.report_health = self._report_health
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
        await self._refresh_health()
        if runtime.engine is not None and self.settings.database_probe_seconds > 0:
            runtime.spawn(lambda: self._probe_database(service), f"database-probe-{service.name}")
        log.info("service serving", extra={"service": service.name})

    async def _report_health(self, name: str, serving: bool) -> None:
        status = (
            health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        await self.health.set(name, status)

    # --- Health while a dependency is out: NOT_SERVING for what it affects, SERVING once it is back.

    async def _refresh_health(self) -> None:
        serving = health_pb2.HealthCheckResponse.SERVING
        not_serving = health_pb2.HealthCheckResponse.NOT_SERVING
        everything = True
        for service in self.services.values():
            up = service.runtime.ready.is_set() and not self._nats_down
            up = up and service.name not in self._databases_down
            everything = everything and up
            await self.health.set(service.full_name, serving if up else not_serving)
            SERVING.labels(service.full_name).set(up)
        started = self._startup is not None and (self._startup.done() or everything)
        await self.health.set("", serving if everything and started else not_serving)
        SERVING.labels("").set(everything and started)

    async def _on_nats_disconnected(self) -> None:
        log.warning("NATS disconnected: services NOT_SERVING until it is back")
        self._nats_down = True
        await self._refresh_health()

    async def _on_nats_reconnected(self) -> None:
        log.info("NATS reconnected")
        self._nats_down = False
        await self._refresh_health()

    def _on_outage(self, service: Service, error: PostmeshError) -> None:
        """A call failed on an unreachable database: probe it, and report the service NOT_SERVING
        until it answers again (no restart needed: the pool reconnects by itself)."""
        if error.reason != "DATABASE_UNAVAILABLE" or service.runtime.engine is None:
            return
        probe = self._probes.get(service.name)
        if probe is None or probe.done():
            self._probes[service.name] = asyncio.create_task(
                self._watch_database(service), name=f"database-probe-{service.name}"
            )

    async def _probe_database(self, service: Service) -> None:
        """Health follows the database even while no call needs it."""
        while True:
            await asyncio.sleep(self.settings.database_probe_seconds)
            engine = service.runtime.engine
            if service.name not in self._databases_down and engine is not None:
                if not await db.reachable(engine):
                    self._on_outage(service, _DATABASE_PROBE_FAILED)

    async def _watch_database(self, service: Service) -> None:
        engine = service.runtime.engine
        assert engine is not None
        if await db.reachable(engine):
            return  # a blip
        log.warning("database unreachable: service NOT_SERVING", extra={"service": service.name})
        self._databases_down.add(service.name)
        await self._refresh_health()
        delay = 0.5
        try:
            while not await db.reachable(engine):
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
        finally:
            self._databases_down.discard(service.name)
        log.info("database reachable again: service SERVING", extra={"service": service.name})
        await self._refresh_health()

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
        if self.health_server is not None:
            await self.health_server.stop(None)
        if self._startup and not self._startup.done():
            self._startup.cancel()
        if self._collector is not None:
            self._collector.cancel()
        for probe in self._probes.values():
            probe.cancel()
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
                try:
                    await self.nats.close()
                except (ConnectionError, OSError, RuntimeError):
                    # The server went away while we stopped: nothing left to flush to it (uvloop
                    # says so with RuntimeError, "the handler is closed").
                    pass
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
