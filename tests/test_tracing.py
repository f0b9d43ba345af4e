"""OpenTelemetry traces from a real `postmesh serve all` process into a real OTLP/gRPC collector on
loopback: one call's trace continues into the services it calls, through the NATS work queue into the
delivery worker, and down to the delivery attempt."""

from __future__ import annotations

import threading
import time
from concurrent import futures

import grpc
import pytest
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

from postmesh.client import Client
from postmesh.common.natsserver import free_port
from postmesh.common.server import resolve_service_names
from postmesh.identity.v1 import identity_pb2


class Collector(trace_service_pb2_grpc.TraceServiceServicer):
    """Keeps every span exported to it: name, trace id, span id, parent span id, service name."""

    def __init__(self) -> None:
        self.spans: list[tuple[str, bytes, bytes, bytes, str]] = []
        self.lock = threading.Lock()

    def Export(
        self, request: trace_service_pb2.ExportTraceServiceRequest, context: grpc.ServicerContext
    ) -> trace_service_pb2.ExportTraceServiceResponse:
        with self.lock:
            for resource_spans in request.resource_spans:
                service = next(
                    (
                        a.value.string_value
                        for a in resource_spans.resource.attributes
                        if a.key == "service.name"
                    ),
                    "",
                )
                for scope in resource_spans.scope_spans:
                    for span in scope.spans:
                        self.spans.append(
                            (span.name, span.trace_id, span.span_id, span.parent_span_id, service)
                        )
        return trace_service_pb2.ExportTraceServiceResponse()


OTLP_PORT = free_port()


@pytest.mark.parametrize(
    "serve_process",
    [
        {
            "DELIVERY_WORKERS": "2",
            "DELIVERY_MODE": "sink",
            "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{OTLP_PORT}",
            "OTEL_BSP_SCHEDULE_DELAY": "200",
        }
    ],
    indirect=True,
)
def test_one_send_is_one_trace_from_the_call_to_the_delivery_attempt(serve_process) -> None:  # type: ignore[no-untyped-def]
    servicer = Collector()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(servicer, server)
    assert server.add_insecure_port(f"127.0.0.1:{OTLP_PORT}") == OTLP_PORT
    server.start()
    try:
        _, address, _, _ = serve_process
        with Client(address, "admin-secret") as admin:
            account = admin.identity.CreateAccount(
                identity_pb2.CreateAccountRequest(name="traced"), timeout=10
            )
        with Client(address, account.api_key_secret) as client:
            # Authenticated through identity (a call between services), then a verification message
            # queued on NATS and delivered by a worker (sink mode).
            client.identity.CreateEmailIdentity(
                identity_pb2.CreateEmailIdentityRequest(email_identity="traced@example.test"), timeout=10
            )
        deadline = time.monotonic() + 60
        while True:
            with servicer.lock:
                spans = list(servicer.spans)
            create = [s for s in spans if s[0].endswith("/CreateEmailIdentity")]
            if create:
                trace_id = create[0][1]
                in_trace = [s for s in spans if s[1] == trace_id]
                names = {s[0] for s in in_trace}
                if {"deliver", "smtp"} <= names:
                    break
            assert time.monotonic() < deadline, f"spans so far: {[s[0] for s in spans]}"
            time.sleep(0.3)
        by_id = {s[2]: s for s in in_trace}
        deliver = next(s for s in in_trace if s[0] == "deliver")
        smtp = next(s for s in in_trace if s[0] == "smtp")
        # The delivery attempt is a child of the delivery, which continues the API call's trace.
        assert by_id[smtp[3]][0] == "deliver"
        assert deliver[3] in by_id
        assert all(s[4] == "postmesh-" + "-".join(resolve_service_names(["all"])) for s in in_trace)
        # The API key was checked with identity inside the same trace (W3C context in gRPC metadata).
        assert any(s[0].endswith("/AuthenticateApiKey") for s in in_trace)
    finally:
        server.stop(None)
