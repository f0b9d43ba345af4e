"""`postmesh account ...`: accounts and API keys."""

from __future__ import annotations

import argparse

from postmesh.cli.common import add_connection_flags, client_for, emit, table
from postmesh.cli.quota import register_account_commands
from postmesh.identity.v1 import identity_pb2 as pb


def _create(args: argparse.Namespace) -> int:
    with client_for(args, admin=True) as client:
        reply = client.identity.CreateAccount(pb.CreateAccountRequest(name=args.name))
    emit(
        args,
        reply,
        f"account: {reply.account.account_id} ({reply.account.name})\n"
        f"api key: {reply.api_key_secret}\n"
        "This key is shown once; postmesh stores only its hash. Use it with:\n"
        f"  export POSTMESH_API_KEY={reply.api_key_secret}",
    )
    return 0


def _list(args: argparse.Namespace) -> int:
    with client_for(args, admin=True) as client:
        reply = client.identity.ListAccounts(
            pb.ListAccountsRequest(page_size=args.page_size, page_token=args.page_token)
        )
    rows = [
        [a.account_id, a.name, pb.AccountStatus.Name(a.status).removeprefix("ACCOUNT_STATUS_")]
        for a in reply.accounts
    ]
    text = table(rows, ["ACCOUNT", "NAME", "STATUS"])
    if reply.next_page_token:
        text += f"\nnext page: --page-token {reply.next_page_token}"
    emit(args, reply, text)
    return 0


def _whoami(args: argparse.Namespace) -> int:
    with client_for(args) as client:
        reply = client.identity.GetCallerIdentity(pb.GetCallerIdentityRequest())
    emit(args, reply, f"account: {reply.account.account_id} ({reply.account.name})\nkey: {reply.key_id}")
    return 0


def _keys_list(args: argparse.Namespace) -> int:
    with client_for(args) as client:
        reply = client.identity.ListApiKeys(pb.ListApiKeysRequest(include_revoked=args.all))
    rows = [
        [k.key_id, "revoked" if k.revoked else "active", k.create_time.ToJsonString(), k.description]
        for k in reply.api_keys
    ]
    emit(args, reply, table(rows, ["KEY", "STATE", "CREATED", "DESCRIPTION"]))
    return 0


def _keys_create(args: argparse.Namespace) -> int:
    with client_for(args) as client:
        reply = client.identity.CreateApiKey(pb.CreateApiKeyRequest(description=args.description))
    emit(args, reply, f"key: {reply.api_key.key_id}\napi key: {reply.api_key_secret}\n(shown once)")
    return 0


def _keys_rotate(args: argparse.Namespace) -> int:
    with client_for(args) as client:
        reply = client.identity.RotateApiKey(pb.RotateApiKeyRequest(key_id=args.key_id))
    emit(
        args,
        reply,
        f"revoked: {reply.revoked_key_id}\nnew key: {reply.api_key.key_id}\napi key: {reply.api_key_secret}",
    )
    return 0


def _keys_revoke(args: argparse.Namespace) -> int:
    with client_for(args) as client:
        reply = client.identity.RevokeApiKey(pb.RevokeApiKeyRequest(key_id=args.key_id))
    emit(args, reply, f"revoked: {reply.api_key.key_id}")
    return 0


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    account = commands.add_parser("account", help="accounts and API keys")
    sub = account.add_subparsers(dest="account_command", required=True)

    create = sub.add_parser("create", help="create an account and its first API key (operator)")
    create.add_argument("name")
    add_connection_flags(create, admin=True)
    create.set_defaults(handler=_create)

    listing = sub.add_parser("list", help="list accounts (operator)")
    listing.add_argument("--page-size", type=int, default=0)
    listing.add_argument("--page-token", default="")
    add_connection_flags(listing, admin=True)
    listing.set_defaults(handler=_list)

    whoami = sub.add_parser("whoami", help="the account the API key belongs to")
    add_connection_flags(whoami)
    whoami.set_defaults(handler=_whoami)

    # Sending state, quota and production access: postmesh.cli.quota.
    register_account_commands(sub)

    keys = sub.add_parser("keys", help="the account's API keys")
    keys_sub = keys.add_subparsers(dest="keys_command", required=True)
    k_list = keys_sub.add_parser("list")
    k_list.add_argument("--all", action="store_true", help="include revoked keys")
    add_connection_flags(k_list)
    k_list.set_defaults(handler=_keys_list)
    k_create = keys_sub.add_parser("create")
    k_create.add_argument("--description", default="")
    add_connection_flags(k_create)
    k_create.set_defaults(handler=_keys_create)
    for name, handler, text in (
        ("rotate", _keys_rotate, "issue a new key and revoke this one"),
        ("revoke", _keys_revoke, "revoke a key"),
    ):
        parser = keys_sub.add_parser(name, help=text)
        parser.add_argument("key_id")
        add_connection_flags(parser)
        parser.set_defaults(handler=handler)
