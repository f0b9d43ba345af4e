"""`postmesh send`, `postmesh send-bulk` and `postmesh template ...`: sending mail and its templates.

Text arguments (--text, --html, --subject, --data) take the value itself, or `@path` to read a file
(`@-` for standard input), as curl does.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TextIO

from postmesh.cli.common import add_connection_flags, client_for, emit, table
from postmesh.sender.v1 import sender_pb2 as pb

BULK_BATCH = 50  # SendBulkEmail's limit on entries per call
# CSV columns that address an entry; every other column is that entry's template data.
_ADDRESS_COLUMNS = ("email", "cc", "bcc")


def _value(text: str | None) -> str:
    """The argument, or the contents of the file it names with a leading '@'."""
    if not text:
        return ""
    if not text.startswith("@"):
        return text
    name = text[1:]
    return sys.stdin.read() if name == "-" else Path(name).read_text(encoding="utf-8")


def _addresses(values: Sequence[str] | None) -> list[str]:
    """--to a@x --to b@x, or --to "a@x, b@x"."""
    result: list[str] = []
    for value in values or []:
        result.extend(part.strip() for part in value.split(",") if part.strip())
    return result


def _tags(values: Sequence[str] | None) -> list[pb.MessageTag]:
    tags = []
    for value in values or []:
        name, equals, tag_value = value.partition("=")
        if not equals:
            raise SystemExit(f"error: --tag {value!r}: use name=value")
        tags.append(pb.MessageTag(name=name, value=tag_value))
    return tags


def _content(args: argparse.Namespace) -> pb.EmailContent:
    chosen = [flag for flag in ("raw", "template") if getattr(args, flag)]
    if args.text or args.html:
        chosen.append("text/html")
    if len(chosen) != 1:
        raise SystemExit("error: give exactly one of --text/--html, --raw FILE or --template NAME")
    if args.raw:
        data = sys.stdin.buffer.read() if args.raw == "-" else Path(args.raw).read_bytes()
        return pb.EmailContent(raw=pb.RawMessage(data=data))
    if args.template:
        return pb.EmailContent(
            template=pb.Template(template_name=args.template, template_data=_value(args.data))
        )
    charset = args.charset
    body = pb.Body()
    if args.text:
        body.text.CopyFrom(pb.Content(data=_value(args.text), charset=charset))
    if args.html:
        body.html.CopyFrom(pb.Content(data=_value(args.html), charset=charset))
    return pb.EmailContent(
        simple=pb.Message(subject=pb.Content(data=_value(args.subject), charset=charset), body=body)
    )


def _send(args: argparse.Namespace) -> int:
    request = pb.SendEmailRequest(
        from_email_address=args.sender or "",
        from_email_address_identity_arn=args.from_identity or "",
        destination=pb.Destination(
            to_addresses=_addresses(args.to),
            cc_addresses=_addresses(args.cc),
            bcc_addresses=_addresses(args.bcc),
        ),
        reply_to_addresses=_addresses(args.reply_to),
        feedback_forwarding_email_address=args.feedback_to or "",
        content=_content(args),
        email_tags=_tags(args.tag),
        configuration_set_name=args.configuration_set or "",
        request_id=args.request_id or "",
    )
    with client_for(args) as client:
        reply = client.sender.SendEmail(request)
    emit(args, reply, f"queued: {reply.message_id}")
    return 0


# --- send-bulk


def _entries(rows: Iterator[dict[str, str]]) -> Iterator[pb.BulkEmailEntry]:
    for row in rows:
        data = {k: v for k, v in row.items() if k and k not in _ADDRESS_COLUMNS}
        yield pb.BulkEmailEntry(
            destination=pb.Destination(
                to_addresses=_addresses([row.get("email") or ""]),
                cc_addresses=_addresses([row.get("cc") or ""]),
                bcc_addresses=_addresses([row.get("bcc") or ""]),
            ),
            replacement_email_content=pb.ReplacementEmailContent(
                replacement_template=pb.ReplacementTemplate(replacement_template_data=json.dumps(data))
            ),
        )


def _progress(out: TextIO, done: int, total: int, failed: int) -> None:
    width = 30
    filled = width * done // total if total else width
    out.write(f"\r[{'#' * filled}{'.' * (width - filled)}] {done}/{total} sent, {failed} failed")
    out.flush()


def _send_bulk(args: argparse.Namespace) -> int:
    with open(args.csv, newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    if rows and "email" not in rows[0]:
        raise SystemExit("error: the CSV needs an 'email' column (and optionally cc, bcc and data columns)")
    entries = list(_entries(iter(rows)))
    failures: list[list[str]] = []
    message_ids: list[str] = []
    done = 0
    with client_for(args) as client:
        _progress(sys.stderr, 0, len(entries), 0)
        for start in range(0, len(entries), BULK_BATCH):
            batch = entries[start : start + BULK_BATCH]
            reply = client.sender.SendBulkEmail(
                pb.SendBulkEmailRequest(
                    from_email_address=args.sender,
                    reply_to_addresses=_addresses(args.reply_to),
                    default_email_tags=_tags(args.tag),
                    default_content=pb.BulkEmailContent(
                        template=pb.Template(
                            template_name=args.template, template_data=_value(args.data) or "{}"
                        )
                    ),
                    bulk_email_entries=batch,
                    configuration_set_name=args.configuration_set or "",
                    request_id=f"{args.request_id}-{start}" if args.request_id else "",
                )
            )
            for offset, result in enumerate(reply.bulk_email_entry_results):
                if result.status == pb.BULK_EMAIL_STATUS_SUCCESS:
                    message_ids.append(result.message_id)
                else:
                    row = rows[start + offset]
                    status = pb.BulkEmailStatus.Name(result.status).removeprefix("BULK_EMAIL_STATUS_")
                    failures.append([str(start + offset + 2), row.get("email", ""), status, result.error])
            done += len(batch)
            _progress(sys.stderr, done, len(entries), len(failures))
        sys.stderr.write("\n")
    print(f"{len(message_ids)} queued, {len(failures)} failed")
    if failures:
        print(table(failures, ["LINE", "EMAIL", "STATUS", "ERROR"]))
    return 1 if failures else 0


# --- templates


def _template_content(args: argparse.Namespace) -> pb.EmailTemplateContent:
    return pb.EmailTemplateContent(
        subject=_value(args.subject), text=_value(args.text), html=_value(args.html)
    )


def _template_create(args: argparse.Namespace) -> int:
    with client_for(args) as client:
        reply = client.sender.CreateEmailTemplate(
            pb.CreateEmailTemplateRequest(template_name=args.name, template_content=_template_content(args))
        )
    emit(args, reply, f"created: {args.name}")
    return 0


def _template_update(args: argparse.Namespace) -> int:
    with client_for(args) as client:
        current = client.sender.GetEmailTemplate(pb.GetEmailTemplateRequest(template_name=args.name))
        content = current.template_content
        # Only the parts given change.
        if args.subject is not None:
            content.subject = _value(args.subject)
        if args.text is not None:
            content.text = _value(args.text)
        if args.html is not None:
            content.html = _value(args.html)
        reply = client.sender.UpdateEmailTemplate(
            pb.UpdateEmailTemplateRequest(template_name=args.name, template_content=content)
        )
    emit(args, reply, f"updated: {args.name}")
    return 0


def _template_get(args: argparse.Namespace) -> int:
    with client_for(args) as client:
        reply = client.sender.GetEmailTemplate(pb.GetEmailTemplateRequest(template_name=args.name))
    content = reply.template_content
    emit(
        args,
        reply,
        f"name: {reply.template_name}\nsubject: {content.subject}\n"
        f"--- text\n{content.text}\n--- html\n{content.html}",
    )
    return 0


def _template_delete(args: argparse.Namespace) -> int:
    with client_for(args) as client:
        reply = client.sender.DeleteEmailTemplate(pb.DeleteEmailTemplateRequest(template_name=args.name))
    emit(args, reply, f"deleted: {args.name}")
    return 0


def _template_list(args: argparse.Namespace) -> int:
    with client_for(args) as client:
        reply = client.sender.ListEmailTemplates(
            pb.ListEmailTemplatesRequest(page_size=args.page_size, page_token=args.page_token)
        )
    rows = [[t.template_name, t.created_timestamp.ToJsonString()] for t in reply.templates_metadata]
    text = table(rows, ["NAME", "CREATED"])
    if reply.next_page_token:
        text += f"\nnext page: --page-token {reply.next_page_token}"
    emit(args, reply, text)
    return 0


def _template_test_render(args: argparse.Namespace) -> int:
    with client_for(args) as client:
        reply = client.sender.TestRenderEmailTemplate(
            pb.TestRenderEmailTemplateRequest(
                template_name=args.name, template_data=_value(args.data) or "{}"
            )
        )
    emit(args, reply, reply.rendered_template)
    return 0


def _add_sending_flags(parser: argparse.ArgumentParser, *, from_required: bool) -> None:
    parser.add_argument(
        "--from", dest="sender", required=from_required, help='"Name <address>" or an address'
    )
    parser.add_argument("--reply-to", action="append", help="Reply-To address (repeatable)")
    parser.add_argument("--tag", action="append", help="message tag name=value (repeatable)")
    parser.add_argument("--configuration-set")
    parser.add_argument("--request-id", help="idempotency key: a retry with it sends nothing new")


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    send = commands.add_parser("send", help="send one message (simple, raw or templated)")
    _add_sending_flags(send, from_required=False)  # a raw message brings its own From
    send.add_argument("--to", action="append", help="recipient (repeatable, or comma-separated)")
    send.add_argument("--cc", action="append")
    send.add_argument("--bcc", action="append")
    send.add_argument("--subject", help="subject (or @file)")
    send.add_argument("--text", help="text body (or @file)")
    send.add_argument("--html", help="HTML body (or @file)")
    send.add_argument("--charset", default="UTF-8")
    send.add_argument("--raw", metavar="FILE", help="a whole MIME message ('-': standard input)")
    send.add_argument("--template", metavar="NAME", help="a stored template")
    send.add_argument("--data", help="template data: a JSON object (or @file)")
    send.add_argument("--from-identity", help="identity of another account that authorized this one")
    send.add_argument("--feedback-to", help="address bounces and complaints are forwarded to")
    add_connection_flags(send)
    send.set_defaults(handler=_send)

    bulk = commands.add_parser("send-bulk", help="send a template to every row of a CSV (batches of 50)")
    _add_sending_flags(bulk, from_required=True)
    bulk.add_argument("--template", metavar="NAME", required=True)
    bulk.add_argument(
        "--csv",
        required=True,
        metavar="FILE",
        help="columns: email (required), cc, bcc; every other column is template data for that row",
    )
    bulk.add_argument("--data", help="default template data for every row: a JSON object (or @file)")
    add_connection_flags(bulk)
    bulk.set_defaults(handler=_send_bulk)

    template = commands.add_parser("template", help="email templates")
    sub = template.add_subparsers(dest="template_command", required=True)
    for name, handler, text in (
        ("create", _template_create, "store a new template"),
        ("update", _template_update, "change a template's parts (those given)"),
    ):
        parser = sub.add_parser(name, help=text)
        parser.add_argument("name")
        parser.add_argument("--subject", required=name == "create", help="subject (or @file)")
        parser.add_argument("--text", help="text part (or @file)")
        parser.add_argument("--html", help="HTML part (or @file)")
        add_connection_flags(parser)
        parser.set_defaults(handler=handler)
    for name, handler, text in (
        ("get", _template_get, "show a template"),
        ("delete", _template_delete, "delete a template"),
    ):
        parser = sub.add_parser(name, help=text)
        parser.add_argument("name")
        add_connection_flags(parser)
        parser.set_defaults(handler=handler)
    listing = sub.add_parser("list", help="list templates")
    listing.add_argument("--page-size", type=int, default=0)
    listing.add_argument("--page-token", default="")
    add_connection_flags(listing)
    listing.set_defaults(handler=_template_list)
    render = sub.add_parser("test-render", help="render a template with data, as a send would")
    render.add_argument("name")
    render.add_argument("--data", help="a JSON object (or @file)")
    add_connection_flags(render)
    render.set_defaults(handler=_template_test_render)
