"""`postmesh quota`, `postmesh stats`, `postmesh account show|details|changes` and the operator's
`postmesh admin accounts|account|requests|grant|deny|pause|reinstate|set-quota`."""

from __future__ import annotations

import argparse
import datetime as dt
from collections.abc import Sequence

from postmesh.cli.common import add_connection_flags, client_for, emit, table
from postmesh.cli.destinations import register_admin_commands as register_dead_letter_commands
from postmesh.cli.filtration import register_admin as register_filtration_admin
from postmesh.quota.v1 import quota_pb2 as pb

BARS = " ▁▂▃▄▅▆▇█"


def _status(value: int) -> str:
    return pb.EnforcementStatus.Name(value).removeprefix("ENFORCEMENT_STATUS_")  # type: ignore[arg-type]


def _review(value: int) -> str:
    return pb.ReviewStatus.Name(value).removeprefix("REVIEW_STATUS_")  # type: ignore[arg-type]


def _when(ts: object) -> str:
    seconds = getattr(ts, "seconds", 0)
    if not seconds:
        return "-"
    return dt.datetime.fromtimestamp(seconds, dt.UTC).strftime("%Y-%m-%d %H:%M")


def _quota_lines(quota: pb.SendQuota) -> list[str]:
    used = quota.sent_last_24_hours / quota.max_24_hour_send if quota.max_24_hour_send else 0.0
    return [
        f"max 24-hour send:   {quota.max_24_hour_send:g}",
        f"max send rate:      {quota.max_send_rate:g}/s",
        f"sent last 24 hours: {quota.sent_last_24_hours:g} ({used:.1%})",
    ]


def _state_lines(
    production: bool, sending: bool, status: int, reason: str, reputation: pb.Reputation
) -> list[str]:
    lines = [
        f"production access:  {'yes' if production else 'no (sandbox)'}",
        f"sending enabled:    {'yes' if sending else 'no'}",
        f"enforcement status: {_status(status)}" + (f" ({reason})" if reason else ""),
        f"bounce rate:        {reputation.bounce_rate:.2%} "
        f"({reputation.bounces_in_window} of {reputation.messages_in_window})",
        f"complaint rate:     {reputation.complaint_rate:.3%} "
        f"({reputation.complaints_in_window} of {reputation.messages_in_window})",
    ]
    return lines


def _changes_table(changes: Sequence[pb.AccountChange]) -> str:
    rows = [
        [
            _when(c.time),
            c.kind,
            c.actor,
            _status(c.enforcement_status),
            f"{c.max_24_hour_send:g}",
            f"{c.max_send_rate:g}",
            c.reason,
        ]
        for c in changes
    ]
    return table(rows, ["TIME", "KIND", "BY", "STATUS", "24H", "RATE", "REASON"])


def sparkline(values: Sequence[int]) -> str:
    """One character per value, scaled to the largest."""
    top = max(values, default=0)
    if top <= 0:
        return BARS[0] * len(values)
    return "".join(BARS[round(v / top * (len(BARS) - 1))] for v in values)


def stats_chart(points: Sequence[pb.SendDataPoint], hours: int, now: dt.datetime) -> str:
    """Delivery attempts, bounces and complaints per 15 minutes over the last `hours`, one column each."""
    slots = hours * 4
    start = now.replace(minute=now.minute - now.minute % 15, second=0, microsecond=0) - dt.timedelta(
        minutes=15 * (slots - 1)
    )
    series = {name: [0] * slots for name in ("attempts", "bounces", "complaints")}
    for point in points:
        at = point.timestamp.ToDatetime(tzinfo=dt.UTC)
        index = int((at - start).total_seconds() // 900)
        if 0 <= index < slots:
            series["attempts"][index] += point.delivery_attempts
            series["bounces"][index] += point.bounces
            series["complaints"][index] += point.complaints
    lines = [f"last {hours} h, one column per 15 minutes (from {start:%Y-%m-%d %H:%M} UTC)"]
    for name, values in series.items():
        lines.append(f"{name:<10} |{sparkline(values)}| max {max(values)}")
    return "\n".join(lines)


# --- Account commands.


def _quota(args: argparse.Namespace) -> int:
    with client_for(args) as client:
        reply = client.quota.GetAccount(pb.GetAccountRequest())
    emit(args, reply.send_quota, "\n".join(_quota_lines(reply.send_quota)))
    return 0


def _stats(args: argparse.Namespace) -> int:
    with client_for(args) as client:
        reply = client.quota.GetSendStatistics(pb.GetSendStatisticsRequest())
    now = dt.datetime.now(dt.UTC)
    since = now - dt.timedelta(hours=args.hours)
    points = [p for p in reply.send_data_points if p.timestamp.ToDatetime(tzinfo=dt.UTC) >= since]
    rows = [
        [
            _when(p.timestamp),
            str(p.delivery_attempts),
            str(p.bounces),
            str(p.complaints),
            str(p.rejects),
            str(p.held),
        ]
        for p in points
    ]
    text = table(rows, ["INTERVAL", "ATTEMPTS", "BOUNCES", "COMPLAINTS", "REJECTS", "HELD"])
    filtered = []
    rejects = sum(p.rejects for p in points)
    if rejects:
        filtered.append(
            f"{rejects} message(s) rejected as Bad content (virus or spam) in the last {args.hours}h"
        )
    held = sum(p.held for p in points)
    released = sum(p.held_released for p in points)
    dropped = sum(p.held_dropped for p in points)
    if held or released or dropped:
        filtered.append(
            f"{held} message(s) held by the spam policy, {released} released and {dropped} dropped"
            f" by an operator in the last {args.hours}h"
        )
    if filtered:
        text += "\n\n" + "\n".join(filtered)
    text += "\n\n" + stats_chart(points, args.hours, now)
    emit(args, reply, text)
    return 0


def _account_show(args: argparse.Namespace) -> int:
    with client_for(args) as client:
        reply = client.quota.GetAccount(pb.GetAccountRequest())
    details = reply.details
    lines = _state_lines(
        reply.production_access_enabled,
        reply.sending_enabled,
        reply.enforcement_status,
        reply.enforcement_reason,
        reply.reputation,
    )
    lines += _quota_lines(reply.send_quota)
    if details.website_url:
        lines += [
            f"mail type:          {pb.MailType.Name(details.mail_type).removeprefix('MAIL_TYPE_')}",
            f"website:            {details.website_url}",
            f"contacts:           {', '.join(details.additional_contact_email_addresses) or '-'}",
        ]
    if details.review_details.case_id:
        lines.append(
            f"production request: {details.review_details.case_id} {_review(details.review_details.status)}"
        )
    emit(args, reply, "\n".join(lines))
    return 0


def _account_details(args: argparse.Namespace) -> int:
    request = pb.PutAccountDetailsRequest(
        mail_type=pb.MailType.Value(f"MAIL_TYPE_{args.mail_type.upper()}"),
        website_url=args.website_url,
        contact_language=pb.ContactLanguage.Value(f"CONTACT_LANGUAGE_{args.language.upper()}"),
        use_case_description=args.use_case,
        additional_contact_email_addresses=args.contact,
        production_access_enabled=args.request_production_access,
        expected_daily_volume=args.expected_daily_volume,
    )
    with client_for(args) as client:
        reply = client.quota.PutAccountDetails(request)
    review = reply.review_details
    text = "details saved"
    if review.case_id:
        text += f"\nproduction access request {review.case_id}: {_review(review.status)}"
    emit(args, reply, text)
    return 0


def _account_changes(args: argparse.Namespace) -> int:
    with client_for(args) as client:
        reply = client.quota.ListAccountChanges(
            pb.ListAccountChangesRequest(page_size=args.page_size, page_token=args.page_token)
        )
    text = _changes_table(reply.changes)
    if reply.next_page_token:
        text += f"\nnext page: --page-token {reply.next_page_token}"
    emit(args, reply, text)
    return 0


def register_account_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """`postmesh account show|details|changes` (called from postmesh.cli.accounts)."""
    show = sub.add_parser("show", help="the account's sending state, quota, reputation and details")
    add_connection_flags(show)
    show.set_defaults(handler=_account_show)

    details = sub.add_parser("details", help="describe your sending; optionally request production access")
    details.add_argument("--mail-type", required=True, choices=["marketing", "transactional"])
    details.add_argument("--website-url", required=True)
    details.add_argument("--use-case", default="", help="how you collect addresses and what you send")
    details.add_argument(
        "--contact", action="append", default=[], help="contact address for notices (repeatable, at most 4)"
    )
    details.add_argument("--language", default="en", choices=["en", "ja"])
    details.add_argument("--expected-daily-volume", type=int, default=0)
    details.add_argument(
        "--request-production-access", action="store_true", help="file a request to leave the sandbox"
    )
    add_connection_flags(details)
    details.set_defaults(handler=_account_details)

    changes = sub.add_parser("changes", help="history of the account's quota and sending state")
    changes.add_argument("--page-size", type=int, default=0)
    changes.add_argument("--page-token", default="")
    add_connection_flags(changes)
    changes.set_defaults(handler=_account_changes)


# --- Operator commands.


def _admin_accounts(args: argparse.Namespace) -> int:
    with client_for(args, admin=True) as client:
        reply = client.quota.ListAccountSendingStates(
            pb.ListAccountSendingStatesRequest(page_size=args.page_size, page_token=args.page_token)
        )
    rows = [
        [
            a.account_id,
            "production" if a.production_access_enabled else "sandbox",
            "yes" if a.sending_enabled else "no",
            _status(a.enforcement_status),
            f"{a.send_quota.sent_last_24_hours:g}/{a.send_quota.max_24_hour_send:g}",
            f"{a.send_quota.max_send_rate:g}",
            f"{a.reputation.bounce_rate:.2%}",
            f"{a.reputation.complaint_rate:.3%}",
        ]
        for a in reply.accounts
    ]
    text = table(rows, ["ACCOUNT", "ACCESS", "SENDING", "STATUS", "24H", "RATE", "BOUNCE", "COMPLAINT"])
    if reply.next_page_token:
        text += f"\nnext page: --page-token {reply.next_page_token}"
    emit(args, reply, text)
    return 0


def _admin_account(args: argparse.Namespace) -> int:
    with client_for(args, admin=True) as client:
        reply = client.quota.GetAccountSendingState(
            pb.GetAccountSendingStateRequest(account_id=args.account_id)
        )
    a = reply.account
    lines = [f"account:            {a.account_id}"]
    lines += _state_lines(
        a.production_access_enabled,
        a.sending_enabled,
        a.enforcement_status,
        a.enforcement_reason,
        a.reputation,
    )
    lines += _quota_lines(a.send_quota)
    emit(args, reply, "\n".join(lines) + "\n\n" + _changes_table(reply.changes))
    return 0


def _admin_requests(args: argparse.Namespace) -> int:
    status = pb.ReviewStatus.Value(f"REVIEW_STATUS_{args.status.upper()}") if args.status else 0
    with client_for(args, admin=True) as client:
        reply = client.quota.ListProductionAccessRequests(
            pb.ListProductionAccessRequestsRequest(
                status=status,  # type: ignore[arg-type]
                page_size=args.page_size,
                page_token=args.page_token,
            )
        )
    rows = [
        [
            r.case_id,
            r.account_id,
            _review(r.status),
            _when(r.create_time),
            str(r.details.expected_daily_volume),
            r.details.website_url,
            r.details.use_case_description[:60],
        ]
        for r in reply.requests
    ]
    text = table(rows, ["CASE", "ACCOUNT", "STATUS", "FILED", "VOLUME/DAY", "WEBSITE", "USE CASE"])
    if reply.next_page_token:
        text += f"\nnext page: --page-token {reply.next_page_token}"
    emit(args, reply, text)
    return 0


def _admin_grant(args: argparse.Namespace) -> int:
    with client_for(args, admin=True) as client:
        reply = client.quota.GrantProductionAccess(
            pb.GrantProductionAccessRequest(
                case_id=args.case_id,
                max_24_hour_send=args.max_24_hour_send,
                max_send_rate=args.max_send_rate,
                note=args.note,
            )
        )
    emit(args, reply, f"granted: {reply.request.case_id} (account {reply.request.account_id})")
    return 0


def _admin_deny(args: argparse.Namespace) -> int:
    with client_for(args, admin=True) as client:
        reply = client.quota.DenyProductionAccess(
            pb.DenyProductionAccessRequest(case_id=args.case_id, note=args.note)
        )
    emit(args, reply, f"denied: {reply.request.case_id} (account {reply.request.account_id})")
    return 0


def _admin_pause(args: argparse.Namespace) -> int:
    with client_for(args, admin=True) as client:
        reply = client.quota.PauseAccountSending(
            pb.PauseAccountSendingRequest(account_id=args.account_id, reason=args.reason)
        )
    emit(args, reply, f"paused: {reply.account.account_id}")
    return 0


def _admin_reinstate(args: argparse.Namespace) -> int:
    with client_for(args, admin=True) as client:
        reply = client.quota.ReinstateAccountSending(
            pb.ReinstateAccountSendingRequest(account_id=args.account_id, reason=args.reason)
        )
    emit(args, reply, f"reinstated: {reply.account.account_id} ({_status(reply.account.enforcement_status)})")
    return 0


def _admin_set_quota(args: argparse.Namespace) -> int:
    with client_for(args, admin=True) as client:
        reply = client.quota.SetAccountQuota(
            pb.SetAccountQuotaRequest(
                account_id=args.account_id,
                max_24_hour_send=args.max_24_hour_send,
                max_send_rate=args.max_send_rate,
                reason=args.reason,
            )
        )
    quota = reply.account.send_quota
    emit(
        args, reply, f"{reply.account.account_id}: {quota.max_24_hour_send:g}/24h, {quota.max_send_rate:g}/s"
    )
    return 0


def _paging(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--page-size", type=int, default=0)
    parser.add_argument("--page-token", default="")


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    quota = commands.add_parser("quota", help="the account's send quota and what it used")
    add_connection_flags(quota)
    quota.set_defaults(handler=_quota)

    stats = commands.add_parser("stats", help="sending statistics: a table and a chart")
    stats.add_argument("--hours", type=int, default=24, help="how far back (at most 336: two weeks)")
    add_connection_flags(stats)
    stats.set_defaults(handler=_stats)

    admin = commands.add_parser("admin", help="operator commands (POSTMESH_ADMIN_KEY)")
    sub = admin.add_subparsers(dest="admin_command", required=True)

    accounts = sub.add_parser("accounts", help="every account's sending state")
    _paging(accounts)
    add_connection_flags(accounts, admin=True)
    accounts.set_defaults(handler=_admin_accounts)

    account = sub.add_parser("account", help="one account's sending state and history")
    account.add_argument("account_id")
    add_connection_flags(account, admin=True)
    account.set_defaults(handler=_admin_account)

    requests = sub.add_parser("requests", help="production access requests")
    requests.add_argument("--status", choices=["pending", "granted", "denied"])
    _paging(requests)
    add_connection_flags(requests, admin=True)
    requests.set_defaults(handler=_admin_requests)

    grant = sub.add_parser("grant", help="grant a production access request")
    grant.add_argument("case_id")
    grant.add_argument("--max-24-hour-send", type=float, default=0.0, help="default: the production default")
    grant.add_argument("--max-send-rate", type=float, default=0.0, help="default: the production default")
    grant.add_argument("--note", default="")
    add_connection_flags(grant, admin=True)
    grant.set_defaults(handler=_admin_grant)

    deny = sub.add_parser("deny", help="deny a production access request")
    deny.add_argument("case_id")
    deny.add_argument("--note", default="")
    add_connection_flags(deny, admin=True)
    deny.set_defaults(handler=_admin_deny)

    for name, handler, text in (
        ("pause", _admin_pause, "pause an account's sending"),
        ("reinstate", _admin_reinstate, "lift a pause or review"),
    ):
        parser = sub.add_parser(name, help=text)
        parser.add_argument("account_id")
        parser.add_argument("--reason", default="")
        add_connection_flags(parser, admin=True)
        parser.set_defaults(handler=handler)

    set_quota = sub.add_parser("set-quota", help="set an account's quota")
    set_quota.add_argument("account_id")
    set_quota.add_argument("--max-24-hour-send", type=float, required=True)
    set_quota.add_argument("--max-send-rate", type=float, required=True)
    set_quota.add_argument("--reason", default="")
    add_connection_flags(set_quota, admin=True)
    set_quota.set_defaults(handler=_admin_set_quota)

    register_filtration_admin(sub)
    register_dead_letter_commands(sub)
