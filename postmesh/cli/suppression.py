"""`postmesh suppression ...`: the account suppression list, its import and export, and which reasons
suppress automatically."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from postmesh.cli.common import add_connection_flags, client_for, emit, table
from postmesh.cli.events import parse_time
from postmesh.client import Client
from postmesh.feedback.v1 import feedback_pb2 as pb

_DONE = (pb.JOB_STATUS_COMPLETED, pb.JOB_STATUS_FAILED)


def _reason_value(name: str) -> pb.SuppressionListReason.ValueType:
    wanted = "SUPPRESSION_LIST_REASON_" + name.strip().upper()
    if wanted not in pb.SuppressionListReason.keys() or wanted.endswith("UNSPECIFIED"):
        raise SystemExit(f"error: unknown reason {name!r}: use BOUNCE or COMPLAINT")
    return pb.SuppressionListReason.Value(wanted)


def _reasons(text: str | None) -> list[pb.SuppressionListReason.ValueType]:
    return [_reason_value(part) for part in (text or "").split(",") if part.strip()]


def _reason_name(value: int) -> str:
    return pb.SuppressionListReason.Name(value).removeprefix("SUPPRESSION_LIST_REASON_")  # type: ignore[arg-type]


def _format(name: str) -> pb.DataFormat.ValueType:
    return pb.DataFormat.Value("DATA_FORMAT_" + name.upper())


def _status(value: int) -> str:
    return pb.JobStatus.Name(value).removeprefix("JOB_STATUS_")  # type: ignore[arg-type]


def _wait_import(client: Client, job_id: str, timeout: float) -> pb.GetImportJobResponse:
    deadline = time.monotonic() + timeout
    while True:
        job = client.feedback.GetImportJob(pb.GetImportJobRequest(job_id=job_id))
        if job.job_status in _DONE or time.monotonic() > deadline:
            return job
        time.sleep(0.5)


def _import(args: argparse.Namespace) -> int:
    path = Path(args.file)
    data = sys.stdin.buffer.read() if args.file == "-" else path.read_bytes()
    data_format = args.format or ("json" if path.suffix.lower() in (".json", ".jsonl", ".ndjson") else "csv")
    action = (
        pb.SUPPRESSION_LIST_IMPORT_ACTION_DELETE if args.delete else pb.SUPPRESSION_LIST_IMPORT_ACTION_PUT
    )
    request = pb.CreateImportJobRequest(
        import_destination=pb.ImportDestination(
            suppression_list_destination=pb.SuppressionListDestination(suppression_list_import_action=action)
        ),
        import_data_source=pb.ImportDataSource(data_format=_format(data_format), data=data),
    )
    with client_for(args) as client:
        job_id = client.feedback.CreateImportJob(request).job_id
        if args.no_wait:
            emit(args, pb.CreateImportJobResponse(job_id=job_id), f"import job {job_id} created")
            return 0
        job = _wait_import(client, job_id, args.timeout)
    lines = [
        f"import job {job.job_id}: {_status(job.job_status)}",
        f"processed: {job.processed_records_count}  failed: {job.failed_records_count}",
    ]
    if job.failure_info.error_message:
        lines.append(f"error: {job.failure_info.error_message}")
    if job.failure_info.failed_records:
        rows = [
            [str(r.record_number), r.record[:60], r.error_message] for r in job.failure_info.failed_records
        ]
        lines.append(table(rows, ["RECORD", "CONTENT", "ERROR"]))
    emit(args, job, "\n".join(lines))
    return 0 if job.job_status == pb.JOB_STATUS_COMPLETED else 1


def _export(args: argparse.Namespace) -> int:
    source = pb.SuppressionListDataSource(reasons=_reasons(args.reasons))
    if args.since:
        source.start_date.FromDatetime(args.since)
    if args.until:
        source.end_date.FromDatetime(args.until)
    request = pb.CreateExportJobRequest(
        export_data_source=pb.ExportDataSource(suppression_list_data_source=source),
        export_destination=pb.ExportDestination(data_format=_format(args.format)),
    )
    with client_for(args) as client:
        job_id = client.feedback.CreateExportJob(request).job_id
        deadline = time.monotonic() + args.timeout
        while True:
            job = client.feedback.GetExportJob(pb.GetExportJobRequest(job_id=job_id))
            if job.job_status in _DONE:
                break
            if time.monotonic() > deadline:
                print(f"error: export job {job_id} is still {_status(job.job_status)}", file=sys.stderr)
                return 1
            time.sleep(0.5)
        if job.job_status != pb.JOB_STATUS_COMPLETED:
            print(f"error: export job {job_id} failed: {job.error_message}", file=sys.stderr)
            return 1
        parts = [job.data]
        offset = job.next_data_offset
        while offset < job.total_bytes:
            more = client.feedback.GetExportJob(pb.GetExportJobRequest(job_id=job_id, data_offset=offset))
            parts.append(more.data)
            offset = more.next_data_offset
    data = b"".join(parts)
    if args.out:
        Path(args.out).write_bytes(data)
        print(f"{job.exported_records_count} addresses written to {args.out}", file=sys.stderr)
    else:
        sys.stdout.write(data.decode())
    return 0


def _list(args: argparse.Namespace) -> int:
    with client_for(args) as client:
        reply = client.feedback.ListSuppressedDestinations(
            pb.ListSuppressedDestinationsRequest(
                reasons=_reasons(args.reasons), page_token=args.page_token or ""
            )
        )
    rows = [
        [s.email_address, _reason_name(s.reason), s.last_update_time.ToJsonString()]
        for s in reply.suppressed_destination_summaries
    ]
    text = table(rows, ["ADDRESS", "REASON", "LAST UPDATE"])
    if reply.next_page_token:
        text += f"\n(more: --page-token {reply.next_page_token})"
    emit(args, reply, text)
    return 0


def _put(args: argparse.Namespace) -> int:
    with client_for(args) as client:
        reply = client.feedback.PutSuppressedDestination(
            pb.PutSuppressedDestinationRequest(email_address=args.address, reason=_reason_value(args.reason))
        )
    emit(args, reply, f"{args.address} suppressed ({args.reason.upper()})")
    return 0


def _delete(args: argparse.Namespace) -> int:
    with client_for(args) as client:
        reply = client.feedback.DeleteSuppressedDestination(
            pb.DeleteSuppressedDestinationRequest(email_address=args.address)
        )
    emit(args, reply, f"{args.address} removed from the suppression list")
    return 0


def _attributes(args: argparse.Namespace) -> int:
    with client_for(args) as client:
        if args.reasons is not None:
            wanted = [] if args.reasons.lower() == "none" else _reasons(args.reasons)
            client.feedback.PutAccountSuppressionAttributes(
                pb.PutAccountSuppressionAttributesRequest(suppressed_reasons=wanted)
            )
        reply = client.feedback.GetAccountSuppressionAttributes(pb.GetAccountSuppressionAttributesRequest())
    names = ",".join(_reason_name(r) for r in reply.suppressed_reasons) or "none"
    emit(args, reply, f"suppressed reasons: {names}")
    return 0


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    suppression = commands.add_parser("suppression", help="the account suppression list")
    sub = suppression.add_subparsers(dest="suppression_command", required=True)

    listing = sub.add_parser("list", help="suppressed addresses")
    add_connection_flags(listing)
    listing.add_argument("--reasons", help="only these reasons: BOUNCE, COMPLAINT or BOUNCE,COMPLAINT")
    listing.add_argument("--page-token", help="the next page, from a previous listing")
    listing.set_defaults(handler=_list)

    put = sub.add_parser("put", help="suppress an address")
    add_connection_flags(put)
    put.add_argument("address")
    put.add_argument("reason", help="BOUNCE or COMPLAINT")
    put.set_defaults(handler=_put)

    remove = sub.add_parser("delete", help="remove an address from the list")
    add_connection_flags(remove)
    remove.add_argument("address")
    remove.set_defaults(handler=_delete)

    load = sub.add_parser("import", help="add (or with --delete, remove) the addresses of a CSV or JSON file")
    add_connection_flags(load)
    load.add_argument("file", help="emailAddress,reason lines (CSV) or JSON objects; - for standard input")
    load.add_argument("--format", choices=["csv", "json"], help="default: from the file name, else csv")
    load.add_argument("--delete", action="store_true", help="remove the file's addresses instead")
    load.add_argument("--no-wait", action="store_true", help="print the job id and return at once")
    load.add_argument("--timeout", type=float, default=600, help="seconds to wait for the job (default 600)")
    load.set_defaults(handler=_import)

    export = sub.add_parser("export", help="write the list as CSV or JSON Lines")
    add_connection_flags(export)
    export.add_argument("--reasons", help="only these reasons: BOUNCE, COMPLAINT or BOUNCE,COMPLAINT")
    export.add_argument("--since", type=parse_time, help="last updated at or after: ISO 8601, or 6h, 2d back")
    export.add_argument("--until", type=parse_time, help="last updated before: ISO 8601, or a duration back")
    export.add_argument("--format", choices=["csv", "json"], default="csv", help="default csv")
    export.add_argument("--out", help="file to write (default: standard output)")
    export.add_argument(
        "--timeout", type=float, default=600, help="seconds to wait for the job (default 600)"
    )
    export.set_defaults(handler=_export)

    reasons = sub.add_parser(
        "reasons", help="which reasons suppress automatically; set them with an argument"
    )
    add_connection_flags(reasons)
    reasons.add_argument("reasons", nargs="?", help="BOUNCE, COMPLAINT, BOUNCE,COMPLAINT or none")
    reasons.set_defaults(handler=_attributes)
