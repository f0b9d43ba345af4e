"""The HTTP server: authenticate (SigV4 through identity), dispatch to SES v2 or v1, render errors.

`postmesh serve gateway` (and `serve all`, `postmesh dev`) runs it next to, or apart from, the gRPC
services; it reaches them through the usual *_ENDPOINT settings with the service credential.
"""

from __future__ import annotations

import datetime as dt
import logging
import secrets
import time
from collections.abc import Callable

from aiohttp import web
from grpc import aio

from postmesh.common.clients import MeshClients
from postmesh.common.metrics import HTTP_API_REQUESTS
from postmesh.common.service import Clock, SystemClock
from postmesh.identity.v1 import identity_pb2
from services.gateway import v1, v2
from services.gateway.auth import HttpRequest, SignatureCheck, signature_check
from services.gateway.calls import AccountCalls, rpc_error
from services.gateway.errors import INTERNAL_FAILURE, PAYLOAD_TOO_LARGE, ApiError

log = logging.getLogger(__name__)


class Gateway:
    def __init__(
        self,
        *,
        listen: str,
        clients: MeshClients,
        clock: Clock | None = None,
        max_skew_seconds: float = 900.0,
        max_body_bytes: int = 60 * 1024 * 1024,
        reuse_port: bool = False,
    ) -> None:
        host, _, port = listen.rpartition(":")
        self._host = host.strip("[]") or "127.0.0.1"
        self._port = int(port)
        self._clients = clients
        self._clock = clock or SystemClock()
        self._max_skew = max_skew_seconds
        self._max_body = max_body_bytes
        self._reuse_port = reuse_port
        self._runner: web.AppRunner | None = None
        self.port = 0

    @property
    def url(self) -> str:
        host = "127.0.0.1" if self._host in ("0.0.0.0", "::", "") else self._host
        return f"http://{host}:{self.port}"

    async def start(self) -> int:
        app = web.Application(client_max_size=self._max_body)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self._host, self._port, reuse_port=self._reuse_port or None)
        await site.start()
        server = site._server
        sockets = getattr(server, "sockets", None) or []
        self.port = sockets[0].getsockname()[1] if sockets else self._port
        log.info("HTTP API listening", extra={"address": self.url})
        return self.port

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def _verify(self, check: SignatureCheck) -> str:
        credential = check.credential
        try:
            reply = await self._clients.identity.VerifyAccessKeySignature(
                identity_pb2.VerifyAccessKeySignatureRequest(
                    access_key_id=credential.access_key_id,
                    scope_date=credential.date,
                    scope_region=credential.region,
                    scope_service=credential.service,
                    string_to_sign=check.string_to_sign,
                    signature=credential.signature,
                ),
                timeout=30,
            )
        except aio.AioRpcError as exc:
            raise rpc_error(exc) from None
        return reply.account_id

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        started = time.perf_counter()
        response, operation = await self._respond(request)
        HTTP_API_REQUESTS.labels(operation, str(response.status)).inc()
        log.info(
            "http",
            extra={
                "operation": operation,
                "method": request.method,
                "path": request.path[:200],
                "status": response.status,
                "request_id": response.headers.get("x-amzn-RequestId", ""),
                "ms": round((time.perf_counter() - started) * 1000, 2),
            },
        )
        return response

    async def _respond(self, request: web.Request) -> tuple[web.StreamResponse, str]:
        """The response, and the SES operation it answered (for metrics; "unknown" if none)."""
        request_id = secrets.token_hex(16)
        is_v2 = request.path.startswith("/v2/")
        render: Callable[[ApiError, str], web.Response] = v2.error_response if is_v2 else v1.error_response
        operation = v2.UNKNOWN
        try:
            try:
                body = await request.read()
            except web.HTTPRequestEntityTooLarge:
                raise ApiError(
                    PAYLOAD_TOO_LARGE, f"The request body exceeds {self._max_body} bytes."
                ) from None
            raw_path, _, raw_query = request.raw_path.partition("?")
            # The operation is known before authentication, so refused signatures are counted by it;
            # a body that is not form data is still reported only once the signature holds.
            form: v1.Form | ApiError = {}
            if is_v2:
                operation = v2.operation_name(request.method, raw_path)
            else:
                try:
                    form = v1.request_form(request.method, request.query, body)
                    operation = v1.operation_name(form)
                except ApiError as exc:
                    form = exc
            check = signature_check(
                HttpRequest(request.method, raw_path, raw_query, request.headers.items(), body),
                self._clock.now().astimezone(dt.UTC),
                self._max_skew,
            )
            account_id = await self._verify(check)
            calls = AccountCalls(self._clients, account_id, request_id)
            if is_v2:
                return await v2.dispatch(calls, request, raw_path, body, request_id), operation
            if isinstance(form, ApiError):
                raise form
            return await v1.dispatch(calls, form, request_id), operation
        except ApiError as exc:
            return render(exc, request_id), operation
        except Exception:
            log.exception("HTTP API request failed", extra={"request_id": request_id})
            error = ApiError(INTERNAL_FAILURE, "Internal failure; the request id is in the log.")
            return render(error, request_id), operation
