"""OpenTelemetry traces across the mesh: a span per gRPC call (server and client side), W3C trace
context carried in gRPC metadata and in NATS message headers, so one send can be followed from the
API call through the queue to the SMTP reply. Off (no work at all on the hot paths) unless
OTEL_EXPORTER_OTLP_ENDPOINT is set; then spans are exported over OTLP/gRPC in batches.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, MutableMapping
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import propagate, trace

_TRACER_NAME = "postmesh"
_enabled = False


def enabled() -> bool:
    return _enabled


def configure_tracing(endpoint: str, service_name: str, *, insecure: bool = True) -> None:
    """Installs the process's tracer provider, exporting to an OTLP/gRPC collector at `endpoint`."""
    global _enabled
    if not endpoint:
        return
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    provider = TracerProvider(resource=Resource.create({"service.name": service_name}))
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=endpoint, insecure=insecure)))
    trace.set_tracer_provider(provider)
    _enabled = True


def shutdown_tracing() -> None:
    """Exports what is buffered (at SIGTERM) so the last spans are not lost."""
    provider = trace.get_tracer_provider()
    shutdown = getattr(provider, "shutdown", None)
    if _enabled and shutdown is not None:
        shutdown()


def inject(carrier: MutableMapping[str, str]) -> None:
    """Adds the current trace context (traceparent, tracestate) to gRPC metadata or NATS headers."""
    if _enabled:
        propagate.inject(carrier)


@contextlib.contextmanager
def span(
    name: str,
    *,
    kind: trace.SpanKind = trace.SpanKind.INTERNAL,
    parent_carrier: Mapping[str, str] | None = None,
    attributes: Mapping[str, Any] | None = None,
) -> Iterator[trace.Span | None]:
    """A span named `name`, a child of the context in `parent_carrier` (incoming metadata or message
    headers) when given, else of the current span. Yields None, and costs nothing, when tracing is off."""
    if not _enabled:
        yield None
        return
    token = None
    if parent_carrier is not None:
        token = otel_context.attach(propagate.extract(dict(parent_carrier)))
    try:
        with trace.get_tracer(_TRACER_NAME).start_as_current_span(
            name, kind=kind, attributes=dict(attributes or {})
        ) as current:
            yield current
    finally:
        if token is not None:
            otel_context.detach(token)
