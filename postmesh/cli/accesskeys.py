"""`postmesh access-keys ...`: SigV4 access keys for the SES-compatible HTTP API."""

from __future__ import annotations

import argparse

from postmesh.cli.common import add_connection_flags, client_for, emit, table
from postmesh.identity.v1 import identity_pb2 as pb


def _create(args: argparse.Namespace) -> int:
    with client_for(args) as client:
        reply = client.identity.CreateAccessKey(pb.CreateAccessKeyRequest(description=args.description))
    emit(
        args,
        reply,
        f"access key id:     {reply.access_key.access_key_id}\n"
        f"secret access key: {reply.secret_access_key}\n"
        "The secret is shown once; postmesh cannot show it again. Use them as AWS credentials:\n"
        f"  export AWS_ACCESS_KEY_ID={reply.access_key.access_key_id}\n"
        f"  export AWS_SECRET_ACCESS_KEY={reply.secret_access_key}",
    )
    return 0


def _list(args: argparse.Namespace) -> int:
    with client_for(args) as client:
        reply = client.identity.ListAccessKeys(pb.ListAccessKeysRequest(include_revoked=args.all))
    rows = [
        [k.access_key_id, "revoked" if k.revoked else "active", k.create_time.ToJsonString(), k.description]
        for k in reply.access_keys
    ]
    emit(args, reply, table(rows, ["ACCESS KEY ID", "STATE", "CREATED", "DESCRIPTION"]))
    return 0


def _revoke(args: argparse.Namespace) -> int:
    with client_for(args) as client:
        reply = client.identity.RevokeAccessKey(pb.RevokeAccessKeyRequest(access_key_id=args.access_key_id))
    emit(args, reply, f"revoked: {reply.access_key.access_key_id}")
    return 0


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    keys = commands.add_parser("access-keys", help="SigV4 access keys for the SES-compatible HTTP API")
    sub = keys.add_subparsers(dest="access_keys_command", required=True)
    create = sub.add_parser("create", help="issue an access key id and secret (the secret is shown once)")
    create.add_argument("--description", default="")
    add_connection_flags(create)
    create.set_defaults(handler=_create)
    listing = sub.add_parser("list", help="list the account's access keys")
    listing.add_argument("--all", action="store_true", help="include revoked keys")
    add_connection_flags(listing)
    listing.set_defaults(handler=_list)
    revoke = sub.add_parser("revoke", help="revoke an access key")
    revoke.add_argument("access_key_id")
    add_connection_flags(revoke)
    revoke.set_defaults(handler=_revoke)
