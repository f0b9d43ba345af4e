"""Entry point of the `postmesh` command. Each area registers its own subcommands."""

from __future__ import annotations

import argparse
import importlib
import sys

import grpc

from postmesh.cli.common import add_connection_flags, client_for, run_handler

# Modules with a register(subparsers) function; later areas add theirs here.
COMMAND_MODULES = [
    "postmesh.cli.server",
    "postmesh.cli.accounts",
    "postmesh.cli.identities",
    "postmesh.cli.sending",
    "postmesh.cli.quota",
    "postmesh.cli.events",
    "postmesh.cli.destinations",
    "postmesh.cli.suppression",
    "postmesh.cli.smtp",
    "postmesh.cli.inbound",
    "postmesh.cli.accesskeys",
]


def _health(args: argparse.Namespace) -> int:
    from postmesh.common.config import SERVICE_NAMES
    from postmesh.common.server import service_class

    with client_for(args) as client:
        worst = 0
        for label, service in [("mesh", ""), *[(n, service_class(n).full_name) for n in SERVICE_NAMES]]:
            try:
                status = client.health_status(service)
            except grpc.RpcError as exc:  # not hosted at this endpoint, or unreachable
                status = f"UNKNOWN ({exc.code().name})"
            print(f"{label:<9} {status}")
            worst = worst or int(status != "SERVING")
    return worst


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="postmesh", description="postmesh: self-hosted email sending")
    commands = parser.add_subparsers(dest="command", required=True)
    health = commands.add_parser("health", help="health of each service at the endpoint")
    add_connection_flags(health)
    health.set_defaults(handler=_health)
    for module_name in COMMAND_MODULES:
        importlib.import_module(module_name).register(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_handler(args.handler, args)


if __name__ == "__main__":
    sys.exit(main())
