"""`postmesh serve ...` (one process, any subset of the services) and `postmesh dev` (`make run`)."""

from __future__ import annotations

import argparse
import asyncio
import os
import secrets
import sys
from pathlib import Path

from postmesh.common.config import SERVICE_NAMES, load_settings, markdown_table
from postmesh.common.logging import configure_logging
from postmesh.common.natsserver import NatsServerProcess
from postmesh.common.server import MeshServer, load_all_service_settings
from services.gateway.serve import NAME as GATEWAY
from services.gateway.serve import serve as serve_with_gateway
from services.identity.dkimkeys import MasterKeys


def _serve(args: argparse.Namespace) -> int:
    load_all_service_settings()
    settings = load_settings()
    configure_logging(settings.log_level)
    names = list(args.services) or ["all"]
    try:
        if GATEWAY in names or "all" in names:
            mesh_names = [n for n in names if n != GATEWAY]
            asyncio.run(serve_with_gateway(settings, mesh_names))
        else:
            asyncio.run(MeshServer(settings, names).serve_until_signalled())
    except ValueError as exc:  # a missing or malformed setting: say which, without a traceback
        print(f"error: {exc}", file=sys.stderr)
        return 2
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
    for name in ("ADMIN_API_KEY", "SERVICE_API_KEY"):
        if not values.get(name):
            values[name] = secrets.token_urlsafe(32)
            changed = True
    if not values.get("DKIM_MASTER_KEYS"):
        # Encrypts DKIM private keys at rest; `postmesh serve` insists on one being configured.
        values["DKIM_MASTER_KEYS"] = MasterKeys.generate("dev")
        changed = True
    if changed:
        data_dir.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(f"{k}={v}\n" for k, v in values.items()))
        path.chmod(0o600)
    return values


def _dev(args: argparse.Namespace) -> int:
    load_all_service_settings()
    base = load_settings()
    data_dir = Path(base.data_dir).resolve()
    overrides: dict[str, object] = {}
    for name, value in _dev_secrets(data_dir).items():
        if not os.environ.get(name):
            overrides[name] = value
    nats_process = None
    if not base.nats_url:
        nats_process = NatsServerProcess(
            data_dir / "nats", port=int(os.environ.get("DEV_NATS_PORT", "0"))
        ).start()
        overrides["NATS_URL"] = nats_process.url
    settings = base.with_overrides(**overrides)
    configure_logging(settings.log_level)
    admin_key = settings.admin_api_key
    started_here = f"  (started here, store in {data_dir / 'nats'})" if nats_process else ""
    print(
        f"""
postmesh is starting on {settings.grpc_listen} (identity, quota, sender, feedback in one process).
  NATS:      {settings.nats_url}{started_here}
  databases: SQLite files in {data_dir}
  metrics:   http://127.0.0.1:{settings.metrics_port}/metrics

In another terminal:
  . .venv/bin/activate
  export POSTMESH_ADMIN_KEY={admin_key}
  postmesh health
  postmesh account create "My team"      # prints an API key: export POSTMESH_API_KEY=...
  postmesh account whoami
  postmesh access-keys create            # AWS credentials for the SES-compatible HTTP API
Stop with Ctrl-C.
""",
        flush=True,
    )
    try:
        asyncio.run(serve_with_gateway(settings, ["all"]))
    finally:
        if nats_process:
            nats_process.stop()
    return 0


def _config(args: argparse.Namespace) -> int:
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
        help=f"all, or any of: {', '.join(SERVICE_NAMES)}, {GATEWAY} (the SES-compatible HTTP API)",
    )
    serve.set_defaults(handler=_serve)

    dev = commands.add_parser("dev", help="run the whole mesh locally on embedded defaults (make run)")
    dev.set_defaults(handler=_dev)

    config = commands.add_parser("config", help="print the settings in force")
    config.add_argument("--markdown", action="store_true", help="print the README's configuration table")
    config.set_defaults(handler=_config)
