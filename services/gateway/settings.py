"""Settings of the HTTP gateway (part of the one schema in postmesh.common.config)."""

from postmesh.common.config import Setting, register

register(
    Setting(
        "HTTP_API_LISTEN",
        str,
        "127.0.0.1:8025",
        "Address of the SES-compatible HTTP API (`postmesh serve gateway`; 0.0.0.0:8025 in Kubernetes).",
    ),
    Setting(
        "HTTP_API_MAX_CLOCK_SKEW_SECONDS",
        float,
        900.0,
        "How far a request's X-Amz-Date may be from the gateway's clock (SES allows 15 minutes).",
    ),
    Setting(
        "HTTP_API_MAX_BODY_BYTES",
        int,
        60 * 1024 * 1024,
        "Largest request body the HTTP API reads (a 40 MB raw message is about 54 MB in base64).",
    ),
)
