"""`postmesh serve ...` (one process, any subset of the services) and `postmesh dev` (`make run`)."""

from __future__ import annotations

import argparse
import os
import secrets
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from postmesh.common import eventloop
from postmesh.common.config import SERVICE_NAMES, UNIT_NAMES, load_settings, markdown_table

if TYPE_CHECKING:
    from postmesh.common.config import Settings

# The server stack (SQLAlchemy, Alembic, the services) is imported by the commands that run it, not
# by every `postmesh` command: the client commands start in a fraction of the time.


def _start_tracing(settings: Settings, services: list[str]) -> None:
    from postmesh.common.server import resolve_service_names
    from postmesh.common.tracing import configure_tracing

    endpoint = settings.otel_exporter_otlp_endpoint
    configure_tracing(
        endpoint,
        "postmesh-" + "-".join(resolve_service_names(services)),
        insecure=not endpoint.startswith("https"),
    )


# The SES-compatible HTTP API (services/gateway): not a gRPC service, served beside them.
GATEWAY = "gateway"


def _worker_processes(args: argparse.Namespace, settings: Settings, names: list[str]) -> int:
    """How many worker processes this `serve` runs: SERVE_PROCESSES (or --processes) for `serve all`
    and `dev`, one for a subset of the services (their replicas are processes of their own already)
    unless --processes says otherwise. 1 inside a worker the supervisor started."""
    from postmesh.common.workers import WorkerRole, process_count

    if WorkerRole.from_environment().count > 1:
        return 1
    if args.processes is not None:
        return process_count(args.processes)
    if "all" not in names:
        return 1
    return process_count(settings.serve_processes)


def _supervise(argv: list[str], count: int, settings: Settings, overrides: dict[str, str]) -> int:
    """Runs `count` workers of the `postmesh` command `argv`, all with the same secrets and ports."""
    from postmesh.common.workers import Supervisor, with_fixed_ports

    env = {**os.environ, **overrides}
    env.update(with_fixed_ports(env, {"GRPC_LISTEN": settings.grpc_listen}))
    # Secrets a single process would make up for itself must be the same in every worker: a call to
    # "this process's port" lands on any of them, and a bounce address made by one is read by another.
    for name in ("SERVICE_API_KEY", "VERP_SECRET"):
        if not env.get(name):
            env[name] = secrets.token_urlsafe(32)
    listen = env.get("GRPC_LISTEN") or settings.grpc_listen
    print(f"postmesh: {count} worker processes sharing {listen} (SERVE_PROCESSES)", flush=True)
    return Supervisor(argv, count, env).run()


def _serve(args: argparse.Namespace) -> int:
    from postmesh.common.logging import configure_logging
    from postmesh.common.server import MeshServer, load_all_service_settings
    from postmesh.common.tracing import shutdown_tracing
    from postmesh.common.workers import WorkerRole

    load_all_service_settings()
    settings = load_settings()
    configure_logging(settings.log_level)
    names = list(args.services) or ["all"]
    try:
        processes = _worker_processes(args, settings, names)
        if processes > 1:
            return _supervise(["serve", *names], processes, settings, {})
        mesh_names = [n for n in names if n != GATEWAY]
        _start_tracing(settings, mesh_names or ["all"])
        worker = WorkerRole.from_environment()
        if GATEWAY in names or "all" in names:
            from services.gateway.serve import serve as serve_with_gateway

            eventloop.run_server(serve_with_gateway(settings, mesh_names, worker=worker), settings.event_loop)
        else:
            eventloop.run_server(
                MeshServer(settings, names, worker=worker).serve_until_signalled(), settings.event_loop
            )
    except ValueError as exc:  # a missing or malformed setting: say which, without a traceback
        print(f"error: {exc}", file=sys.stderr)
        return 2
    finally:
        shutdown_tracing()
    return 0


def _migrate(args: argparse.Namespace) -> int:
    from postmesh.common.logging import configure_logging
    from postmesh.common.server import load_all_service_settings, migrate_services

    load_all_service_settings()
    settings = load_settings()
    configure_logging(settings.log_level)
    try:
        migrated = eventloop.run(migrate_services(settings, args.services), settings.event_loop)
    except ValueError as exc:  # an unknown service name
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:  # the database refused or is unreachable: say so, exit non-zero
        print(f"error: migration failed: {exc!r}", file=sys.stderr)
        return 1
    for name in migrated:
        print(f"{name}: migrated to head")
    return 0


def _dev_secrets(data_dir: Path) -> dict[str, str]:
    """Admin and service keys for the local mesh, made once and kept in DATA_DIR/dev-secrets.env."""
    path = data_dir / "dev-secrets.env"
    values: dict[str, str] = {}
    if path.exists():
        for line in path.read_text().splitlines():
            name, _, value = line.partition("=")
            if value:
                values[name] = value
    changed = False
    # TRACKING_SECRET signs open and click tracking URLs (sender and feedback share it); VERP_SECRET
    # tags bounce addresses.
    for name in ("ADMIN_API_KEY", "SERVICE_API_KEY", "TRACKING_SECRET", "VERP_SECRET"):
        if not values.get(name):
            values[name] = secrets.token_urlsafe(32)
            changed = True
    if not values.get("DKIM_MASTER_KEYS"):
        from services.identity.dkimkeys import MasterKeys

        # Encrypts DKIM private keys at rest; `postmesh serve` insists on one being configured.
        values["DKIM_MASTER_KEYS"] = MasterKeys.generate("dev")
        changed = True
    if changed:
        data_dir.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(f"{k}={v}\n" for k, v in values.items()))
        path.chmod(0o600)
    return values


# High ports, so `make run` needs no privileges; production uses 587/2587 and 465/2465.
DEV_SMTP_STARTTLS = "127.0.0.1:2587"
DEV_SMTP_TLS = "127.0.0.1:2465"


def _dev_smtp(base: Settings, data_dir: Path) -> dict[str, object]:
    """SMTP listeners on high ports with a self-signed certificate made once in DATA_DIR, unless the
    environment configures them."""
    overrides: dict[str, object] = {}
    if not os.environ.get("SMTP_STARTTLS_LISTEN") and not os.environ.get("SMTP_TLS_LISTEN"):
        overrides["SMTP_STARTTLS_LISTEN"] = DEV_SMTP_STARTTLS
        overrides["SMTP_TLS_LISTEN"] = DEV_SMTP_TLS
    if not base.smtp_tls_cert_file and not base.smtp_tls_key_file:
        cert, key = data_dir / "smtp-cert.pem", data_dir / "smtp-key.pem"
        if not (cert.exists() and key.exists()):
            from services.sender.smtp.tls import write_self_signed

            write_self_signed(cert, key)
        overrides["SMTP_TLS_CERT_FILE"] = str(cert)
        overrides["SMTP_TLS_KEY_FILE"] = str(key)
    return overrides


# `postmesh dev` flag -> the setting it sets.
_DEV_FLAGS = {
    "listen": "GRPC_LISTEN",
    "data_dir": "DATA_DIR",
    "nats_port": "DEV_NATS_PORT",
    "metrics_port": "METRICS_PORT",
    "http_api_listen": "HTTP_API_LISTEN",
}


def _dev(args: argparse.Namespace) -> int:
    from postmesh.common.logging import configure_logging
    from postmesh.common.natsserver import NatsServerProcess
    from postmesh.common.server import load_all_service_settings
    from postmesh.common.tracing import shutdown_tracing

    # Flags win over the environment, which wins over the defaults.
    for flag, name in _DEV_FLAGS.items():
        value = getattr(args, flag, None)
        if value is not None:
            os.environ[name] = str(value)
    load_all_service_settings()
    base = load_settings()
    data_dir = Path(base.data_dir).resolve()
    overrides: dict[str, object] = {}
    for name, value in _dev_secrets(data_dir).items():
        if not os.environ.get(name):
            overrides[name] = value
    overrides.update(_dev_smtp(base, data_dir))
    nats_process = None
    if not base.nats_url:
        try:
            nats_process = NatsServerProcess(data_dir / "nats", port=base.dev_nats_port).start()
        except (OSError, RuntimeError) as exc:
            print(
                f"error: could not start nats-server on 127.0.0.1:{base.dev_nats_port} ({exc}); "
                "choose another port with --nats-port (0: any free port) or set NATS_URL",
                file=sys.stderr,
            )
            return 2
        overrides["NATS_URL"] = nats_process.url
    settings = base.with_overrides(**overrides)
    configure_logging(settings.log_level)
    processes = _worker_processes(args, settings, ["all"])
    admin_key = settings.admin_api_key
    filters = [
        *([f"virus scanning (clamd {settings.clamd_url})"] if settings.clamd_url else []),
        *(
            [f"spam scoring (rspamd {settings.rspamd_url}, policy {settings.spam_policy})"]
            if settings.rspamd_url
            else []
        ),
    ]
    started_here = f"  (started here, store in {data_dir / 'nats'})" if nats_process else ""
    metrics_line = (
        f"  metrics:   http://127.0.0.1:{settings.metrics_port}/metrics\n" if settings.metrics_port else ""
    )
    print(
        f"""
postmesh is starting on {settings.grpc_listen} (identity, quota, sender, feedback in {processes} process(es)).
  NATS:      {settings.nats_url}{started_here}
  databases: SQLite files in {data_dir}
{metrics_line}  tracking:  http://{settings.tracking_http_listen} (tracked links and the open pixel)
  SMTP:      STARTTLS {settings.smtp_starttls_listen or "off"}, TLS {settings.smtp_tls_listen or "off"}
             certificate {settings.smtp_tls_cert_file}
  filters:   {", ".join(filters) or "none (set CLAMD_URL and/or RSPAMD_URL to scan outgoing mail)"}
  bounces:   SMTP on {settings.inbound_smtp_listen or "(off)"} (the bounce domains' MX; see docs/feedback.md)

In another terminal:
  . .venv/bin/activate
  export POSTMESH_ADMIN_KEY={admin_key}
  postmesh health
  postmesh account create "My team"      # prints an API key: export POSTMESH_API_KEY=...
  postmesh account whoami
  postmesh smtp-credentials create       # a user name and password for SMTP clients
  postmesh access-keys create            # AWS credentials for the SES-compatible HTTP API
Stop with Ctrl-C.
""",
        flush=True,
    )
    try:
        if processes > 1:
            # The workers run `serve all` with what `dev` chose (secrets, NATS, SMTP listeners).
            env = {name: str(value) for name, value in overrides.items()}
            return _supervise(["serve", "all"], processes, settings, env)
        _start_tracing(settings, ["all"])
        from services.gateway.serve import serve as serve_with_gateway

        eventloop.tune_collector_for_server()
        eventloop.run(serve_with_gateway(settings, ["all"]), settings.event_loop)
    finally:
        shutdown_tracing()
        if nats_process:
            nats_process.stop()
    return 0


def _config(args: argparse.Namespace) -> int:
    from postmesh.common.server import load_all_service_settings

    load_all_service_settings()
    if args.markdown:
        print(markdown_table())
        return 0
    settings = load_settings()
    from postmesh.common.config import SCHEMA

    for setting in SCHEMA:
        value = settings.get(setting.name)
        shown = "********" if setting.secret and value else value
        print(f"{setting.name}={shown}")
    return 0


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    serve = commands.add_parser("serve", help="run some or all services in this process")
    serve.add_argument(
        "services",
        nargs="*",
        default=["all"],
        help=f"all, or any of: {', '.join(UNIT_NAMES)}, {GATEWAY} (the SES-compatible HTTP API)",
    )
    serve.add_argument(
        "--processes",
        type=int,
        default=None,
        help="worker processes sharing the ports (default: SERVE_PROCESSES for all, else 1; 0: per core)",
    )
    serve.set_defaults(handler=_serve)

    migrate = commands.add_parser(
        "migrate", help="apply the database migrations of some or all services, then exit"
    )
    migrate.add_argument(
        "services", nargs="*", default=["all"], help=f"all, or any of: {', '.join(SERVICE_NAMES)}"
    )
    migrate.set_defaults(handler=_migrate)

    dev = commands.add_parser(
        "dev",
        help="run the whole mesh locally on embedded defaults (make run)",
        description="The whole mesh in one process: SQLite files and a nats-server of its own in the data "
        "folder (unless NATS_URL is set), development secrets made once, mail delivered to .eml files. "
        "Every flag also has an environment variable; flags win.",
    )
    dev.add_argument("--listen", help="gRPC address (GRPC_LISTEN, default 127.0.0.1:50051)")
    dev.add_argument(
        "--data-dir", help="folder for SQLite files, NATS, secrets and mail (DATA_DIR, default ./var)"
    )
    dev.add_argument(
        "--nats-port",
        type=int,
        help="port of the nats-server it starts (DEV_NATS_PORT, default 14222; 0: any)",
    )
    dev.add_argument("--metrics-port", type=int, help="Prometheus /metrics port (METRICS_PORT; 0: off)")
    dev.add_argument("--http-api-listen", help="SES-compatible HTTP API address (HTTP_API_LISTEN)")
    dev.add_argument(
        "--processes", type=int, default=None, help="worker processes (default: SERVE_PROCESSES; 0: per core)"
    )
    dev.set_defaults(handler=_dev)

    config = commands.add_parser("config", help="print the settings in force")
    config.add_argument(
        "--markdown", action="store_true", help="print the settings table (docs/configuration.md)"
    )
    config.set_defaults(handler=_config)
