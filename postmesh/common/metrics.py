"""Prometheus metrics that operators alert on, named in one place (the dashboard in deploy/grafana/
refers to these names, and a test checks that it refers to nothing else), and the collector that
exports JetStream queue depth and consumer lag."""

from __future__ import annotations

import asyncio
import logging

from nats.js import JetStreamContext
from nats.js.errors import NotFoundError
from prometheus_client import Counter, Gauge

from postmesh.common.streams import ALL_STREAMS

log = logging.getLogger(__name__)

# Every attempt's end per recipient: delivered, bounced_permanent, bounced_transient, delayed.
DELIVERY_OUTCOMES = Counter(
    "postmesh_delivery_outcomes_total", "Delivery attempt outcomes per recipient", ["result"]
)
# Messages put back on the queue for a later attempt (a transient failure of some recipient).
DELIVERY_RETRIES = Counter("postmesh_delivery_retries_scheduled_total", "Messages re-queued for a retry")
SMTP_CONNECTIONS = Counter(
    "postmesh_delivery_smtp_connections_total",
    "SMTP connections opened to receiving servers, by destination host and outcome",
    ["destination", "result"],
)
DKIM_SIGNING_FAILURES = Counter(
    "postmesh_dkim_signing_failures_total", "Messages that could not be DKIM-signed", ["reason"]
)
# Domain errors answered to callers by reason: MAX_SEND_RATE_EXCEEDED, DAILY_QUOTA_EXCEEDED (quota
# refusals), MESSAGE_REJECTED, ...
REFUSALS = Counter("postmesh_refusals_total", "Calls refused with a postmesh reason", ["method", "reason"])
# The SES-compatible HTTP API: requests by SES operation (v2 operation or v1 Action; "unknown" for
# paths and actions SES does not have) and HTTP status.
HTTP_API_REQUESTS = Counter(
    "postmesh_http_api_requests_total",
    "SES-compatible HTTP API requests by operation and HTTP status",
    ["operation", "status"],
)

STREAM_MESSAGES = Gauge("postmesh_stream_messages", "Messages stored in a JetStream stream", ["stream"])
STREAM_BYTES = Gauge("postmesh_stream_bytes", "Bytes stored in a JetStream stream", ["stream"])
CONSUMER_PENDING = Gauge(
    "postmesh_consumer_pending",
    "Messages not yet delivered to a durable consumer (lag)",
    ["stream", "consumer"],
)
CONSUMER_ACK_PENDING = Gauge(
    "postmesh_consumer_ack_pending",
    "Messages handed to a consumer and not yet acknowledged",
    ["stream", "consumer"],
)
CONSUMER_REDELIVERED = Gauge(
    "postmesh_consumer_redelivered", "Messages delivered to a consumer more than once", ["stream", "consumer"]
)

# A smaller destination label set: mail servers are many; the MX host's last two labels are enough
# to see which provider is slow or refusing, without one time series per host.
_MAX_DESTINATION_LABEL = 64


def destination_label(host: str) -> str:
    labels = host.rstrip(".").lower().split(".")
    return ".".join(labels[-2:])[:_MAX_DESTINATION_LABEL] or "unknown"


async def collect_jetstream(js: JetStreamContext) -> None:
    """One reading of every stream's depth and every durable consumer's lag."""
    for spec in ALL_STREAMS:
        try:
            info = await js.stream_info(spec.name)
            consumers = await js.consumers_info(spec.name)
        except NotFoundError:
            continue
        STREAM_MESSAGES.labels(spec.name).set(info.state.messages)
        STREAM_BYTES.labels(spec.name).set(info.state.bytes)
        for consumer in consumers:
            name = consumer.name
            CONSUMER_PENDING.labels(spec.name, name).set(consumer.num_pending or 0)
            CONSUMER_ACK_PENDING.labels(spec.name, name).set(consumer.num_ack_pending or 0)
            CONSUMER_REDELIVERED.labels(spec.name, name).set(consumer.num_redelivered or 0)


async def collect_jetstream_forever(js: JetStreamContext, interval: float = 15.0) -> None:
    while True:
        try:
            await collect_jetstream(js)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # NATS away for a moment: the next reading catches up
            log.debug("jetstream metrics not collected", extra={"error": repr(exc)})
        await asyncio.sleep(interval)
