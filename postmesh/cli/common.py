"""What every CLI command shares: the client, output as text or JSON, and error reporting."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable
from typing import Any

import grpc
from google.protobuf.json_format import MessageToDict
from google.protobuf.message import Message

from postmesh.client import Client, error_details

Handler = Callable[[argparse.Namespace], int]


def client_for(args: argparse.Namespace, *, admin: bool = False) -> Client:
    if admin:
        key = getattr(args, "admin_key", None) or os.environ.get("POSTMESH_ADMIN_KEY", "")
        if not key:
            raise SystemExit("error: this is an operator command: set POSTMESH_ADMIN_KEY or pass --admin-key")
    else:
        key = getattr(args, "api_key", None) or os.environ.get("POSTMESH_API_KEY", "")
    return Client(
        endpoint=getattr(args, "endpoint", None),
        api_key=key,
        tls=True if getattr(args, "tls", False) else None,
        ca_file=getattr(args, "ca_file", None),
        server_name=getattr(args, "server_name", None),
    )


def add_connection_flags(parser: argparse.ArgumentParser, *, admin: bool = False) -> None:
    parser.add_argument(
        "--endpoint", help="host:port of postmesh (default: $POSTMESH_ENDPOINT or localhost:50051)"
    )
    parser.add_argument("--tls", action="store_true", help="connect over TLS (default: $POSTMESH_TLS)")
    parser.add_argument(
        "--ca-file", help="CA that signed the server's certificate (default: $POSTMESH_CA_FILE)"
    )
    parser.add_argument(
        "--server-name", help="name the server's certificate carries, if not the endpoint's host"
    )
    if admin:
        parser.add_argument("--admin-key", help="operator credential (default: $POSTMESH_ADMIN_KEY)")
    else:
        parser.add_argument("--api-key", help="API key (default: $POSTMESH_API_KEY)")
    parser.add_argument("--json", action="store_true", help="print the raw response as JSON")


def to_dict(message: Message) -> dict[str, Any]:
    return MessageToDict(message, preserving_proto_field_name=True)


def emit(args: argparse.Namespace, message: Message, text: str | None = None) -> None:
    if getattr(args, "json", False) or text is None:
        print(json.dumps(to_dict(message), indent=2, sort_keys=True))
    else:
        print(text)


def table(rows: list[list[str]], headers: list[str]) -> str:
    widths = [max(len(str(cell)) for cell in column) for column in zip(headers, *rows, strict=False)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True))]
    lines += ["  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)) for row in rows]
    return "\n".join(line.rstrip() for line in lines)


def run_handler(handler: Handler, args: argparse.Namespace) -> int:
    try:
        return handler(args)
    except grpc.RpcError as error:
        details = error_details(error)
        reason = f" [{details.reason}]" if details.reason else ""
        extra = "".join(f" {k}={v}" for k, v in sorted(details.metadata.items()))
        retry = f" (retry after {details.retry_after_seconds:g}s)" if details.retry_after_seconds else ""
        print(f"error: {details.code.name}{reason}: {details.message}{extra}{retry}", file=sys.stderr)
        return 1
