"""One typed schema for every postmesh setting: name, type, default and a one-line description.

Settings come from environment variables. The configuration table (docs/configuration.md) is generated from
SCHEMA (`postmesh config --markdown`), and a test checks that the two agree.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

SERVICE_NAMES = ("identity", "quota", "sender", "feedback")
# What `postmesh serve` can host: the four gRPC services and the SMTP submission server (part of the
# sender, deployable apart from it).
UNIT_NAMES = (*SERVICE_NAMES, "smtp")


@dataclass(frozen=True)
class Setting:
    name: str
    type: type
    default: Any
    description: str
    secret: bool = False


def _parse_bool(raw: str) -> bool:
    value = raw.strip().lower()
    if value in {"1", "true", "yes", "on"}:
        return True
    if value in {"0", "false", "no", "off", ""}:
        return False
    raise ValueError(f"not a boolean: {raw!r}")


_PARSERS: dict[type, Callable[[str], Any]] = {
    str: str,
    int: int,
    float: float,
    bool: _parse_bool,
}

SCHEMA: list[Setting] = [
    Setting(
        "GRPC_LISTEN",
        str,
        "127.0.0.1:50051",
        "Address the gRPC server listens on (0.0.0.0:50051 in Kubernetes).",
    ),
    Setting("METRICS_PORT", int, 9464, "Port of the Prometheus /metrics HTTP endpoint; 0 disables it."),
    Setting(
        "SERVE_PROCESSES",
        int,
        0,
        "Worker processes of `serve all` and `postmesh dev`, sharing their ports; 0: one per core.",
    ),
    Setting(
        "EVENT_LOOP",
        str,
        "auto",
        "Event loop of each process: asyncio, uvloop, or auto (uvloop when it is installed, else asyncio).",
    ),
    Setting("LOG_LEVEL", str, "INFO", "Log level of the JSON logs on stderr (DEBUG, INFO, WARNING, ERROR)."),
    Setting(
        "DATA_DIR", str, "./var", "Folder for the embedded defaults: SQLite files, NATS store, sink mail."
    ),
    Setting(
        "DATABASE_URL",
        str,
        "",
        "SQLAlchemy URL of every hosted service's database; empty: a SQLite file per service in DATA_DIR.",
        secret=True,
    ),
    *[
        Setting(
            f"{name.upper()}_DATABASE_URL",
            str,
            "",
            f"Database URL of the {name} service alone; overrides DATABASE_URL.",
            secret=True,
        )
        for name in SERVICE_NAMES
    ],
    Setting("NATS_URL", str, "", "NATS server with JetStream; empty: `postmesh dev` starts one in DATA_DIR."),
    Setting(
        "DEV_NATS_PORT",
        int,
        14222,
        "Port of the nats-server `postmesh dev` starts when NATS_URL is empty (0: any free port).",
    ),
    Setting("NATS_STREAM_REPLICAS", int, 1, "Replicas of each JetStream stream (3 on a NATS cluster)."),
    Setting(
        "NATS_DUPLICATE_WINDOW_SECONDS",
        float,
        120.0,
        "JetStream's duplicate window on each stream (publishes with the same Nats-Msg-Id are stored once).",
    ),
    Setting(
        "ADMIN_API_KEY", str, "", "Operator credential for admin-only RPCs; empty disables them.", secret=True
    ),
    Setting(
        "SERVICE_API_KEY",
        str,
        "",
        "Credential the services present to each other; must be the same on every replica.",
        secret=True,
    ),
    *[
        Setting(
            f"{name.upper()}_ENDPOINT",
            str,
            "",
            f"host:port of the {name} service; empty: this process when it hosts {name}, else GRPC_LISTEN.",
        )
        for name in SERVICE_NAMES
    ],
    Setting(
        "GRPC_TLS_CERT_FILE",
        str,
        "",
        "PEM certificate (chain) of the gRPC server; with GRPC_TLS_KEY_FILE, gRPC is served over TLS only.",
    ),
    Setting(
        "GRPC_TLS_KEY_FILE", str, "", "PEM private key of GRPC_TLS_CERT_FILE; re-read when the files change."
    ),
    Setting(
        "GRPC_TLS_CLIENT_CA_FILE",
        str,
        "",
        "CA that signs client certificates: set, every gRPC client must present one (mutual TLS).",
    ),
    Setting(
        "GRPC_TLS_CA_FILE",
        str,
        "",
        "CA that checks the other services' certificates on calls between services (empty: system roots).",
    ),
    Setting(
        "GRPC_TLS_SERVER_NAME",
        str,
        "",
        "Name the other services' certificates must carry; empty: the host of each *_ENDPOINT.",
    ),
    Setting(
        "HEALTH_LISTEN",
        str,
        "",
        "Extra plain-text address serving only gRPC health (Kubernetes probes speak no TLS); empty: none.",
    ),
    Setting(
        "OTEL_EXPORTER_OTLP_ENDPOINT",
        str,
        "",
        "OTLP/gRPC collector (http://host:4317) for traces of calls, queued messages and SMTP; empty: off.",
    ),
    Setting(
        "AUTH_CACHE_SECONDS",
        float,
        30.0,
        "How long a service trusts an API key it has checked with identity.",
    ),
    Setting(
        "STARTUP_RETRY_MAX_SECONDS", float, 30.0, "Longest wait between retries to reach NATS or a database."
    ),
    Setting(
        "DATABASE_PROBE_SECONDS",
        float,
        10.0,
        "How often each service checks its database, to report NOT_SERVING while it is out; 0: never.",
    ),
    Setting(
        "SHUTDOWN_GRACE_SECONDS",
        float,
        10.0,
        "On SIGTERM, how long in-flight calls may run before they are cut.",
    ),
]


class SettingsError(ValueError):
    """A setting's value cannot be parsed as its type."""


@dataclass
class Settings:
    """Parsed settings. Read values with attribute access: settings.nats_url."""

    values: dict[str, Any] = field(default_factory=dict)

    def __getattr__(self, item: str) -> Any:
        try:
            return self.values[item.upper()]
        except KeyError:
            raise AttributeError(item) from None

    def get(self, name: str) -> Any:
        return self.values[name]

    def with_overrides(self, **overrides: Any) -> Settings:
        values = dict(self.values)
        for key, value in overrides.items():
            values[key.upper()] = value
        return Settings(values)

    def database_url(self, service: str) -> str:
        url = self.values.get(f"{service.upper()}_DATABASE_URL") or self.values.get("DATABASE_URL")
        if url:
            return str(url)
        return f"sqlite+aiosqlite:///{os.path.join(self.values['DATA_DIR'], service + '.db')}"


# The settings every process has; services' own settings follow, in whatever order they are imported.
_CORE_SETTINGS = len(SCHEMA)


def register(*settings: Setting) -> None:
    """Lets a service add its own settings to the one schema (at import time). Two services may share a
    setting (DNS_RESOLVER, say) only by declaring it identically."""
    known = {s.name: s for s in SCHEMA}
    for setting in settings:
        existing = known.get(setting.name)
        if existing is None:
            SCHEMA.append(setting)
            known[setting.name] = setting
        elif existing != setting:
            raise ValueError(f"setting {setting.name} is declared twice, differently")


def load_settings(environ: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
    environ = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    for setting in SCHEMA:
        raw = environ.get(setting.name)
        if raw is None:
            values[setting.name] = setting.default
            continue
        try:
            values[setting.name] = _PARSERS[setting.type](raw)
        except ValueError as exc:
            raise SettingsError(f"{setting.name}: {exc}") from exc
    for key, value in overrides.items():
        values[key.upper()] = value
    return Settings(values)


def markdown_table() -> str:
    """The configuration table of docs/configuration.md."""
    lines = ["| Variable | Type | Default | Description |", "| --- | --- | --- | --- |"]
    ordered = SCHEMA[:_CORE_SETTINGS] + sorted(SCHEMA[_CORE_SETTINGS:], key=lambda s: s.name)
    for s in ordered:
        default = "" if s.default == "" else f"`{s.default}`"
        lines.append(f"| `{s.name}` | {s.type.__name__} | {default} | {s.description} |")
    return "\n".join(lines)
