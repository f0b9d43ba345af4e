"""`postmesh events`: the account's recent email events, or one message's timeline (--message-id)."""

from __future__ import annotations

import argparse
import datetime as dt

from postmesh.cli.common import add_connection_flags, client_for, emit, table
from postmesh.cli.destinations import register_follow
from postmesh.events.v1 import events_pb2 as ev
from postmesh.feedback.v1 import feedback_pb2 as pb

_TYPE_PREFIX = "EMAIL_EVENT_TYPE_"


def _event_type(name: str) -> ev.EmailEventType.ValueType:
    """bounce, Bounce, BOUNCE, delivery-delay, DELIVERY_DELAY ... -> the enum value."""
    wanted = _TYPE_PREFIX + name.strip().upper().replace("-", "_")
    if wanted not in ev.EmailEventType.keys() or wanted.endswith("UNSPECIFIED"):
        known = ", ".join(k.removeprefix(_TYPE_PREFIX).lower() for k in ev.EmailEventType.keys()[1:])
        raise argparse.ArgumentTypeError(f"unknown event type {name!r} (one of {known})")
    return ev.EmailEventType.Value(wanted)


def parse_time(value: str) -> dt.datetime:
    """An ISO 8601 time (UTC unless it says otherwise), or a duration back from now: 30m, 6h, 2d."""
    units = {"m": 60, "h": 3600, "d": 86400}
    if value[-1:] in units and value[:-1].isdigit():
        return dt.datetime.now(dt.UTC) - dt.timedelta(seconds=int(value[:-1]) * units[value[-1]])
    try:
        parsed = dt.datetime.fromisoformat(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r}: give an ISO 8601 time or a duration like 6h") from None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=dt.UTC)


def _type(event: ev.Event) -> str:
    return ev.EmailEventType.Name(event.email.event_type).removeprefix(_TYPE_PREFIX)


def recipients(email: ev.EmailEvent) -> list[str]:
    kind = email.event_type
    if kind == ev.EMAIL_EVENT_TYPE_DELIVERY:
        return list(email.delivery.recipients)
    if kind == ev.EMAIL_EVENT_TYPE_BOUNCE:
        return [r.email_address for r in email.bounce.bounced_recipients]
    if kind == ev.EMAIL_EVENT_TYPE_COMPLAINT:
        return [r.email_address for r in email.complaint.complained_recipients]
    if kind == ev.EMAIL_EVENT_TYPE_DELIVERY_DELAY:
        return [r.email_address for r in email.delivery_delay.delayed_recipients]
    return list(email.mail.destination)


def detail(email: ev.EmailEvent) -> str:
    """One line saying what happened, as a user reads it."""
    kind = email.event_type
    if kind == ev.EMAIL_EVENT_TYPE_DELIVERY:
        return email.delivery.smtp_response
    if kind == ev.EMAIL_EVENT_TYPE_BOUNCE:
        bounce = email.bounce
        kind_name = ev.BounceType.Name(bounce.bounce_type).removeprefix("BOUNCE_TYPE_").title()
        sub = ev.BounceSubType.Name(bounce.bounce_sub_type).removeprefix("BOUNCE_SUB_TYPE_")
        sub = "".join(part.title() for part in sub.split("_"))
        first = bounce.bounced_recipients[0] if bounce.bounced_recipients else ev.BouncedRecipient()
        return f"{kind_name}/{sub} {first.status} {first.diagnostic_code}".strip()
    if kind == ev.EMAIL_EVENT_TYPE_COMPLAINT:
        return email.complaint.complaint_feedback_type or "complaint"
    if kind == ev.EMAIL_EVENT_TYPE_DELIVERY_DELAY:
        delay = email.delivery_delay
        late = delay.delayed_recipients[0] if delay.delayed_recipients else ev.DelayedRecipient()
        return f"{delay.delay_type} attempt {delay.attempt} {late.status} {late.diagnostic_code}".strip()
    if kind == ev.EMAIL_EVENT_TYPE_REJECT:
        return email.reject.reason
    if kind == ev.EMAIL_EVENT_TYPE_HOLD:
        action = ev.HoldAction.Name(email.hold.action).removeprefix("HOLD_ACTION_").lower()
        return f"{action}: {email.hold.details}"
    if kind == ev.EMAIL_EVENT_TYPE_RENDERING_FAILURE:
        return f"{email.rendering_failure.template_name}: {email.rendering_failure.error_message}"
    if kind == ev.EMAIL_EVENT_TYPE_SEND:
        return email.mail.subject
    return ""


def _row(event: ev.Event, *, with_message: bool) -> list[str]:
    when = event.time.ToDatetime(tzinfo=dt.UTC).strftime("%Y-%m-%d %H:%M:%S")
    simulated = " (simulator)" if event.email.simulated else ""
    row = [when, _type(event) + simulated]
    if with_message:
        row.append(event.email.mail.message_id)
    return [*row, ", ".join(recipients(event.email)), detail(event.email)[:100]]


def _timeline(args: argparse.Namespace) -> int:
    with client_for(args) as client:
        reply = client.feedback.GetMessageInsights(pb.GetMessageInsightsRequest(message_id=args.message_id))
    header = [
        f"message:  {reply.message_id}",
        f"from:     {reply.from_email_address}",
        f"subject:  {reply.subject}",
        "",
    ]
    rows = [_row(e, with_message=False) for e in reply.events]
    emit(args, reply, "\n".join(header) + table(rows, ["TIME (UTC)", "EVENT", "RECIPIENTS", "DETAIL"]))
    return 0


def _events(args: argparse.Namespace) -> int:
    if args.message_id and not (args.type or args.recipient or args.since or args.until):
        return _timeline(args)
    request = pb.ListEmailEventsRequest(
        event_types=args.type or [],
        recipient=args.recipient or "",
        message_id=args.message_id or "",
        page_size=args.limit,
        page_token=args.page_token or "",
    )
    if args.since:
        request.start_time.FromDatetime(args.since)
    if args.until:
        request.end_time.FromDatetime(args.until)
    with client_for(args) as client:
        reply = client.feedback.ListEmailEvents(request)
    rows = [_row(e, with_message=True) for e in reply.events]
    text = table(rows, ["TIME (UTC)", "EVENT", "MESSAGE ID", "RECIPIENTS", "DETAIL"])
    if reply.next_page_token:
        text += f"\n(more: --page-token {reply.next_page_token})"
    emit(args, reply, text)
    return 0


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    events = commands.add_parser(
        "events", help="recent email events (newest first), or one message's timeline with --message-id"
    )
    add_connection_flags(events)
    events.add_argument("--message-id", help="only this message; alone, prints its timeline oldest first")
    events.add_argument(
        "--type",
        action="append",
        type=_event_type,
        help="only this event type (repeatable): bounce, delivery...",
    )
    events.add_argument("--recipient", help="only events about this recipient")
    events.add_argument("--since", type=parse_time, help="from: ISO 8601, or a duration back (6h, 2d)")
    events.add_argument("--until", type=parse_time, help="before this time: ISO 8601, or a duration back")
    events.add_argument("--limit", type=int, default=50, help="events per page (default 50)")
    events.add_argument("--page-token", help="the next page, from a previous listing")
    events.set_defaults(handler=_events)
    # `postmesh events follow`: the live stream instead of the stored events.
    register_follow(events.add_subparsers(dest="events_command", required=False))
