"""`postmesh smtp-credentials ...`: user names and passwords for the SMTP submission server."""

from __future__ import annotations

import argparse

from postmesh.cli.common import add_connection_flags, client_for, emit, table
from postmesh.identity.v1 import smtp_credentials_pb2 as pb


def _create(args: argparse.Namespace) -> int:
    with client_for(args) as client:
        reply = client.identity.CreateSmtpCredential(
            pb.CreateSmtpCredentialRequest(description=args.description)
        )
    emit(
        args,
        reply,
        f"username: {reply.credential.username}\npassword: {reply.password}\n"
        "The password is shown once; postmesh stores only its hash.",
    )
    return 0


def _list(args: argparse.Namespace) -> int:
    with client_for(args) as client:
        reply = client.identity.ListSmtpCredentials(
            pb.ListSmtpCredentialsRequest(
                include_revoked=args.all, page_size=args.page_size, page_token=args.page_token
            )
        )
    rows = [
        [
            c.username,
            "revoked" if c.revoked else "active",
            c.create_time.ToJsonString(),
            c.last_used_time.ToJsonString() if c.HasField("last_used_time") else "",
            c.description,
        ]
        for c in reply.credentials
    ]
    text = table(rows, ["USERNAME", "STATE", "CREATED", "LAST USED", "DESCRIPTION"])
    if reply.next_page_token:
        text += f"\nnext page: --page-token {reply.next_page_token}"
    emit(args, reply, text)
    return 0


def _revoke(args: argparse.Namespace) -> int:
    with client_for(args) as client:
        reply = client.identity.RevokeSmtpCredential(pb.RevokeSmtpCredentialRequest(username=args.username))
    emit(args, reply, f"revoked: {reply.credential.username}")
    return 0


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = commands.add_parser("smtp-credentials", help="SMTP user names and passwords of the account")
    sub = parser.add_subparsers(dest="smtp_command", required=True)

    create = sub.add_parser("create", help="issue a user name and password (the password is shown once)")
    create.add_argument("--description", default="")
    add_connection_flags(create)
    create.set_defaults(handler=_create)

    listing = sub.add_parser("list", help="list the account's SMTP credentials (never their passwords)")
    listing.add_argument("--all", action="store_true", help="include revoked credentials")
    listing.add_argument("--page-size", type=int, default=0)
    listing.add_argument("--page-token", default="")
    add_connection_flags(listing)
    listing.set_defaults(handler=_list)

    revoke = sub.add_parser("revoke", help="revoke a credential; SMTP servers refuse it at once")
    revoke.add_argument("username")
    add_connection_flags(revoke)
    revoke.set_defaults(handler=_revoke)
