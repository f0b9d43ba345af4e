"""Operator commands for content filtration: `postmesh admin held list|show|release|drop` and
`postmesh admin spam-policy ACCOUNT [--mode ... --threshold ...]`."""

from __future__ import annotations

import argparse
import sys

from postmesh.cli.common import add_connection_flags, client_for, emit, table
from postmesh.sender.v1 import filtration_pb2 as fpb

_MODES = {"off": 1, "tag": 2, "hold": 3, "reject": 4, "default": 0}
_MODE_NAMES = {value: name for name, value in _MODES.items()}


def _when(held: fpb.HeldMessage) -> str:
    return held.held_time.ToDatetime().strftime("%Y-%m-%d %H:%M")


def _held_list(args: argparse.Namespace) -> int:
    with client_for(args, admin=True) as client:
        reply = client.sender.ListHeldMessages(
            fpb.ListHeldMessagesRequest(
                account_id=args.account or "", page_size=args.page_size, page_token=args.page_token
            )
        )
    rows = [
        [m.message_id, m.account_id, _when(m), f"{m.spam_score:.1f}", m.from_address, m.subject[:40]]
        for m in reply.messages
    ]
    text = table(rows, ["MESSAGE", "ACCOUNT", "HELD", "SCORE", "FROM", "SUBJECT"])
    text += f"\n{len(reply.messages)} held message(s)" + (
        f"; next page: --page-token {reply.next_page_token}" if reply.next_page_token else ""
    )
    emit(args, reply, text)
    return 0


def _held_show(args: argparse.Namespace) -> int:
    with client_for(args, admin=True) as client:
        reply = client.sender.GetHeldMessage(fpb.GetHeldMessageRequest(message_id=args.message_id))
    if args.raw:
        sys.stdout.buffer.write(reply.raw_message)
        return 0
    held = reply.message
    lines = [
        f"message:    {held.message_id}",
        f"account:    {held.account_id}",
        f"held:       {_when(held)} UTC",
        f"why:        {held.details}",
        f"from:       {held.from_address}",
        f"recipients: {', '.join(held.recipients)}",
        f"subject:    {held.subject}",
        f"size:       {held.size_bytes} bytes (--raw prints the message)",
    ]
    emit(args, held, "\n".join(lines))
    return 0


def _held_release(args: argparse.Namespace) -> int:
    with client_for(args, admin=True) as client:
        reply = client.sender.ReleaseHeldMessage(fpb.ReleaseHeldMessageRequest(message_id=args.message_id))
    emit(args, reply, f"released: {args.message_id} (queued for delivery)")
    return 0


def _held_drop(args: argparse.Namespace) -> int:
    with client_for(args, admin=True) as client:
        reply = client.sender.DropHeldMessage(fpb.DropHeldMessageRequest(message_id=args.message_id))
    emit(args, reply, f"dropped: {args.message_id} (a Reject event tells the account)")
    return 0


def _spam_policy(args: argparse.Namespace) -> int:
    with client_for(args, admin=True) as client:
        if args.mode is not None:
            client.sender.PutAccountSpamPolicy(
                fpb.PutAccountSpamPolicyRequest(
                    account_id=args.account_id,
                    policy=fpb.SpamPolicy(mode=_MODES[args.mode], threshold=args.threshold),  # type: ignore[arg-type]
                )
            )
        reply = client.sender.GetAccountSpamPolicy(
            fpb.GetAccountSpamPolicyRequest(account_id=args.account_id)
        )
    whose = "the account's own" if reply.account_specific else "the default"
    mode = _MODE_NAMES.get(reply.policy.mode, "?")
    emit(args, reply, f"{args.account_id}: {mode} above {reply.policy.threshold:g} ({whose})")
    return 0


def register_admin(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    held = sub.add_parser("held", help="messages held by the spam policy")
    actions = held.add_subparsers(dest="held_command", required=True)
    listing = actions.add_parser("list", help="held messages")
    listing.add_argument("--account", help="only this account's")
    listing.add_argument("--page-size", type=int, default=0)
    listing.add_argument("--page-token", default="")
    add_connection_flags(listing, admin=True)
    listing.set_defaults(handler=_held_list)
    show = actions.add_parser("show", help="one held message")
    show.add_argument("message_id")
    show.add_argument("--raw", action="store_true", help="print the message itself")
    add_connection_flags(show, admin=True)
    show.set_defaults(handler=_held_show)
    for name, handler, text in (
        ("release", _held_release, "send a held message on"),
        ("drop", _held_drop, "drop a held message (a Reject event)"),
    ):
        parser = actions.add_parser(name, help=text)
        parser.add_argument("message_id")
        add_connection_flags(parser, admin=True)
        parser.set_defaults(handler=handler)

    policy = sub.add_parser("spam-policy", help="show or set an account's spam policy")
    policy.add_argument("account_id")
    policy.add_argument("--mode", choices=list(_MODES), help="default: back to SPAM_POLICY")
    policy.add_argument("--threshold", type=float, default=0.0, help="0: SPAM_THRESHOLD")
    add_connection_flags(policy, admin=True)
    policy.set_defaults(handler=_spam_policy)
