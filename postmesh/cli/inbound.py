"""`postmesh admin classify FILE` and `postmesh admin inbound list|show|retry`: the operator's view
of returned mail at the feedback service's inbound listener."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from postmesh.cli.common import add_connection_flags, client_for, emit, table
from postmesh.events.v1 import events_pb2 as ev
from postmesh.feedback.v1 import inbound_pb2 as pb


def _type_name(value: int) -> str:
    return ev.BounceType.Name(value).removeprefix("BOUNCE_TYPE_").title() if value else ""  # type: ignore[arg-type]


def _sub_type_name(value: int) -> str:
    name = ev.BounceSubType.Name(value).removeprefix("BOUNCE_SUB_TYPE_")  # type: ignore[arg-type]
    return "".join(part.title() for part in name.split("_")) if value else ""


def describe(result: pb.InboundClassification) -> str:
    kind = pb.InboundKind.Name(result.kind).removeprefix("INBOUND_KIND_").lower()
    lines = [f"kind:      {kind} ({result.format})"]
    if result.feedback_type:
        lines.append(f"feedback:  {result.feedback_type}  user agent: {result.user_agent or '-'}")
    if result.reporting_mta:
        lines.append(f"reported:  by {result.reporting_mta}")
    if result.recipients:
        rows = [
            [
                r.email_address,
                _type_name(r.bounce_type),
                _sub_type_name(r.bounce_sub_type),
                r.status,
                r.diagnostic_code[:70],
            ]
            for r in result.recipients
        ]
        lines.append(table(rows, ["recipient", "type", "subtype", "status", "diagnostic"]))
    if result.message_id:
        lines.append(f"message:   {result.message_id} of account {result.account_id}")
    lines.append(f"mapping:   {result.mapping or '-'}")
    lines.append(
        f"records:   {len(result.events)} event(s)" if result.events else f"kept:      {result.reason}"
    )
    return "\n".join(lines)


def _classify(args: argparse.Namespace) -> int:
    raw = sys.stdin.buffer.read() if args.file == "-" else Path(args.file).read_bytes()
    with client_for(args, admin=True) as client:
        reply = client.feedback.ClassifyInboundMessage(
            pb.ClassifyInboundMessageRequest(raw=raw, mail_from=args.mail_from, rcpt_to=args.rcpt_to)
        )
    emit(args, reply, describe(reply.classification))
    return 0


def _list(args: argparse.Namespace) -> int:
    with client_for(args, admin=True) as client:
        reply = client.feedback.ListInboundReports(
            pb.ListInboundReportsRequest(page_size=args.page_size, page_token=args.page_token)
        )
    rows = [
        [r.report_id, r.receive_time.ToDatetime().isoformat(timespec="seconds"), r.format, r.reason[:80]]
        for r in reply.reports
    ]
    text = table(rows, ["report", "received", "format", "reason"]) if rows else "no kept reports"
    if reply.next_page_token:
        text += f"\nmore: --page-token {reply.next_page_token}"
    emit(args, reply, text)
    return 0


def _show(args: argparse.Namespace) -> int:
    with client_for(args, admin=True) as client:
        reply = client.feedback.GetInboundReport(pb.GetInboundReportRequest(report_id=args.report_id))
    if args.raw:
        sys.stdout.buffer.write(reply.raw)
        return 0
    report = reply.report
    head = (
        f"report:    {report.report_id} received {report.receive_time.ToDatetime().isoformat()} "
        f"({report.size_bytes} bytes)\nenvelope:  from <{report.mail_from}> to {', '.join(report.rcpt_to)}\n"
        f"kept for:  {report.reason}\n"
    )
    emit(args, reply, head + describe(reply.classification))
    return 0


def _retry(args: argparse.Namespace) -> int:
    with client_for(args, admin=True) as client:
        reply = client.feedback.RetryInboundReport(pb.RetryInboundReportRequest(report_id=args.report_id))
    emit(args, reply, ("recorded\n" if reply.recorded else "still kept\n") + describe(reply.classification))
    return 0


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    # `postmesh admin` is created by postmesh.cli.quota; these join its subcommands.
    admin = commands.choices["admin"]
    sub = next(a for a in admin._actions if isinstance(a, argparse._SubParsersAction))

    classify = sub.add_parser("classify", help="what a raw bounce or complaint would record (dry run)")
    classify.add_argument("file", help="the raw message (.eml), or - for standard input")
    classify.add_argument("--mail-from", default="", help="envelope sender it arrives with (bounces: empty)")
    classify.add_argument("--rcpt-to", action="append", default=[], help="envelope recipient (repeatable)")
    add_connection_flags(classify, admin=True)
    classify.set_defaults(handler=_classify)

    inbound = sub.add_parser("inbound", help="returned mail kept because it mapped to nothing")
    inbound_sub = inbound.add_subparsers(dest="inbound_command", required=True)
    listing = inbound_sub.add_parser("list", help="kept reports, oldest first")
    listing.add_argument("--page-size", type=int, default=0)
    listing.add_argument("--page-token", default="")
    add_connection_flags(listing, admin=True)
    listing.set_defaults(handler=_list)
    show = inbound_sub.add_parser("show", help="one kept report and what it reads as now")
    show.add_argument("report_id")
    show.add_argument("--raw", action="store_true", help="print the raw message only")
    add_connection_flags(show, admin=True)
    show.set_defaults(handler=_show)
    retry = inbound_sub.add_parser("retry", help="map a kept report again and record it if it maps now")
    retry.add_argument("report_id")
    add_connection_flags(retry, admin=True)
    retry.set_defaults(handler=_retry)
