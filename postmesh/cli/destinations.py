"""`postmesh config-set ...`, `postmesh webhook test`, `postmesh events follow` and
`postmesh admin dead-letters ...`: configuration sets, event destinations and the event stream."""

from __future__ import annotations

import argparse
import datetime as dt
import json
import queue
import sys
import time
import urllib.error
import urllib.request

from postmesh.cli.common import add_connection_flags, client_for, emit, table, to_dict
from postmesh.events.v1 import events_pb2 as ev
from postmesh.feedback.v1 import configuration_sets_pb2 as cs
from postmesh.sender.v1 import filtration_pb2, queue_pb2

_TYPES = [
    n.removeprefix("EMAIL_EVENT_TYPE_") for n in ev.EmailEventType.keys() if not n.endswith("UNSPECIFIED")
]


def _event_types(text: str) -> list[ev.EmailEventType.ValueType]:
    types = []
    for name in (t.strip().upper().replace("-", "_") for t in text.split(",") if t.strip()):
        if name not in _TYPES:
            raise SystemExit(f"error: unknown event type {name!r}; one of {', '.join(_TYPES)}")
        types.append(ev.EmailEventType.Value("EMAIL_EVENT_TYPE_" + name))
    return types


def _type_names(values: object) -> str:
    return ",".join(ev.EmailEventType.Name(v).removeprefix("EMAIL_EVENT_TYPE_") for v in values)  # type: ignore[attr-defined]


# --- config-set

_SPAM_MODES = ["off", "tag", "hold", "reject", "none"]


def _spam_policy(mode: str, threshold: float) -> filtration_pb2.SpamPolicy:
    """--spam-policy and --spam-threshold as the RPCs take them; "none": the set has no policy."""
    if mode == "none":
        return filtration_pb2.SpamPolicy()
    return filtration_pb2.SpamPolicy(
        mode=filtration_pb2.SpamPolicyMode.Value("SPAM_POLICY_MODE_" + mode.upper()), threshold=threshold
    )


def _spam_text(found: cs.ConfigurationSet) -> str:
    policy = found.filtration_options.spam_policy
    if not policy.mode:
        return "the account's"
    mode = filtration_pb2.SpamPolicyMode.Name(policy.mode).removeprefix("SPAM_POLICY_MODE_").lower()
    if mode in ("off", "tag"):
        return f"{mode} (the account's, where stricter, still applies)"
    threshold = f"{policy.threshold:g}" if policy.threshold else "the default threshold"
    return f"{mode} above {threshold} (the account's, where stricter, still applies)"


def _create(args: argparse.Namespace) -> int:
    request = cs.CreateConfigurationSetRequest(
        configuration_set_name=args.name,
        sending_options=cs.SendingOptions(sending_enabled=not args.paused),
        delivery_options=cs.DeliveryOptions(
            tls_policy=queue_pb2.TLS_POLICY_REQUIRE
            if args.tls_policy == "require"
            else queue_pb2.TLS_POLICY_OPTIONAL,
            max_delivery_seconds=args.max_delivery_seconds,
        ),
        reputation_options=cs.ReputationOptions(reputation_metrics_enabled=args.reputation_metrics),
    )
    if args.suppressed_reasons is not None:
        reasons = [r.strip().upper() for r in args.suppressed_reasons.split(",") if r.strip()]
        request.suppression_options.CopyFrom(cs.SuppressionOptions(suppressed_reasons=reasons))
    if args.spam_policy:
        request.filtration_options.spam_policy.CopyFrom(_spam_policy(args.spam_policy, args.spam_threshold))
    with client_for(args) as client:
        reply = client.feedback.CreateConfigurationSet(request)
    emit(args, reply, f"configuration set {args.name} created")
    return 0


def _list(args: argparse.Namespace) -> int:
    with client_for(args) as client:
        reply = client.feedback.ListConfigurationSets(
            cs.ListConfigurationSetsRequest(page_size=args.page_size, page_token=args.page_token)
        )
    text = "\n".join(reply.configuration_sets) or "(no configuration sets)"
    if reply.next_page_token:
        text += f"\nnext page: --page-token {reply.next_page_token}"
    emit(args, reply, text)
    return 0


def _destination_rows(destinations: list[cs.EventDestination]) -> str:
    rows = []
    for d in destinations:
        if d.HasField("webhook"):
            target = d.webhook.url
            status = cs.SubscriptionStatus.Name(d.webhook.subscription_status).removeprefix(
                "SUBSCRIPTION_STATUS_"
            )
            kind = "webhook/" + cs.WebhookFormat.Name(d.webhook.format).removeprefix("WEBHOOK_FORMAT_")
            if d.webhook.topic_arn:
                target += f" ({d.webhook.topic_arn}, SignatureVersion {d.webhook.signature_version})"
        else:
            target, status = d.nats_subject.full_subject, "-"
            kind = "nats/" + cs.NatsPayloadFormat.Name(d.nats_subject.format).removeprefix(
                "NATS_PAYLOAD_FORMAT_"
            )
        rows.append(
            [d.name, "yes" if d.enabled else "no", kind, target, status, _type_names(d.matching_event_types)]
        )
    return table(rows, ["NAME", "ENABLED", "KIND", "TARGET", "STATUS", "EVENTS"])


def _show(args: argparse.Namespace) -> int:
    with client_for(args) as client:
        found = client.feedback.GetConfigurationSet(
            cs.GetConfigurationSetRequest(configuration_set_name=args.name)
        ).configuration_set
        destinations = client.feedback.GetConfigurationSetEventDestinations(
            cs.GetConfigurationSetEventDestinationsRequest(configuration_set_name=args.name)
        )
    if args.json:
        print(
            json.dumps(
                {"configuration_set": to_dict(found), "event_destinations": to_dict(destinations)}, indent=2
            )
        )
        return 0
    reasons = (
        ",".join(found.suppression_options.suppressed_reasons) or "none"
        if found.HasField("suppression_options")
        else "account-level"
    )
    print(f"configuration set: {found.configuration_set_name}")
    print(f"sending:           {'enabled' if found.sending_options.sending_enabled else 'PAUSED'}")
    tls = queue_pb2.TlsPolicy.Name(found.delivery_options.tls_policy).removeprefix("TLS_POLICY_")
    print(f"tls policy:        {tls}")
    seconds = found.delivery_options.max_delivery_seconds
    print(f"max delivery:      {f'{seconds} s' if seconds else 'default'}")
    print(f"reputation:        {'on' if found.reputation_options.reputation_metrics_enabled else 'off'}")
    print(f"suppression:       {reasons}")
    print(f"redirect domain:   {found.tracking_options.custom_redirect_domain or '-'}")
    print(f"spam policy:       {_spam_text(found)}")
    print(_destination_rows(list(destinations.event_destinations)))
    return 0


def _update(args: argparse.Namespace) -> int:
    """The Put*Options operations, each only when its flag is given."""
    name = args.name
    done = []
    with client_for(args) as client:
        fb = client.feedback
        if args.pause or args.resume:
            fb.PutConfigurationSetSendingOptions(
                cs.PutConfigurationSetSendingOptionsRequest(
                    configuration_set_name=name, sending_enabled=args.resume
                )
            )
            done.append("sending " + ("resumed" if args.resume else "paused"))
        if args.tls_policy or args.max_delivery_seconds is not None:
            # The Put replaces both delivery options: keep the one not given.
            current = fb.GetConfigurationSet(
                cs.GetConfigurationSetRequest(configuration_set_name=name)
            ).configuration_set.delivery_options
            policy = current.tls_policy
            if args.tls_policy:
                policy = (
                    queue_pb2.TLS_POLICY_REQUIRE
                    if args.tls_policy == "require"
                    else queue_pb2.TLS_POLICY_OPTIONAL
                )
            seconds = (
                current.max_delivery_seconds
                if args.max_delivery_seconds is None
                else args.max_delivery_seconds
            )
            fb.PutConfigurationSetDeliveryOptions(
                cs.PutConfigurationSetDeliveryOptionsRequest(
                    configuration_set_name=name, tls_policy=policy, max_delivery_seconds=seconds
                )
            )
            done.append("delivery options set")
        if args.reputation_metrics:
            fb.PutConfigurationSetReputationOptions(
                cs.PutConfigurationSetReputationOptionsRequest(
                    configuration_set_name=name, reputation_metrics_enabled=args.reputation_metrics == "on"
                )
            )
            done.append(f"reputation metrics {args.reputation_metrics}")
        if args.suppressed_reasons is not None:
            account_level = args.suppressed_reasons.lower() == "account"
            reasons = (
                []
                if account_level
                else [r.strip().upper() for r in args.suppressed_reasons.split(",") if r.strip()]
            )
            fb.PutConfigurationSetSuppressionOptions(
                cs.PutConfigurationSetSuppressionOptionsRequest(
                    configuration_set_name=name, suppressed_reasons=reasons, use_account_level=account_level
                )
            )
            done.append("suppression options set")
        if args.redirect_domain is not None:
            fb.PutConfigurationSetTrackingOptions(
                cs.PutConfigurationSetTrackingOptionsRequest(
                    configuration_set_name=name, custom_redirect_domain=args.redirect_domain
                )
            )
            done.append("tracking options set")
        if args.spam_policy:
            fb.PutConfigurationSetFiltrationOptions(
                cs.PutConfigurationSetFiltrationOptionsRequest(
                    configuration_set_name=name,
                    spam_policy=_spam_policy(args.spam_policy, args.spam_threshold),
                )
            )
            done.append("filtration options set")
    print(f"{name}: " + (", ".join(done) or "nothing to change"))
    return 0


def _delete(args: argparse.Namespace) -> int:
    with client_for(args) as client:
        reply = client.feedback.DeleteConfigurationSet(
            cs.DeleteConfigurationSetRequest(configuration_set_name=args.name)
        )
    emit(args, reply, f"configuration set {args.name} deleted")
    return 0


def _destination_add(args: argparse.Namespace) -> int:
    definition = cs.EventDestinationDefinition(
        enabled=not args.disabled, matching_event_types=_event_types(args.events)
    )
    if args.webhook:
        fmt = cs.WEBHOOK_FORMAT_SNS if args.format == "sns" else cs.WEBHOOK_FORMAT_JSON
        definition.webhook.CopyFrom(
            cs.WebhookDestination(url=args.webhook, format=fmt, signature_version=args.signature_version)
        )
    else:
        fmt_nats = (
            cs.NATS_PAYLOAD_FORMAT_PROTOBUF if args.format == "protobuf" else cs.NATS_PAYLOAD_FORMAT_JSON
        )
        definition.nats_subject.CopyFrom(
            cs.NatsSubjectDestination(subject=args.nats_subject, format=fmt_nats)
        )
    with client_for(args) as client:
        reply = client.feedback.CreateConfigurationSetEventDestination(
            cs.CreateConfigurationSetEventDestinationRequest(
                configuration_set_name=args.set,
                event_destination_name=args.name,
                event_destination=definition,
            )
        )
    text = f"event destination {args.name} added to {args.set}"
    if args.webhook and args.format == "sns":
        text += (
            "\nSNS format: a SubscriptionConfirmation was sent; nothing else is sent until the endpoint "
            "fetches its SubscribeURL or you run `postmesh config-set destination confirm "
            f"{args.set} {args.name}`."
        )
    elif reply.signing_secret:
        text += (
            f"\nsigning secret: {reply.signing_secret}\n"
            "This secret is shown once. Verify X-Postmesh-Signature with it (see docs/events.md)."
        )
    emit(args, reply, text)
    return 0


def _destination_list(args: argparse.Namespace) -> int:
    with client_for(args) as client:
        reply = client.feedback.GetConfigurationSetEventDestinations(
            cs.GetConfigurationSetEventDestinationsRequest(configuration_set_name=args.set)
        )
    emit(args, reply, _destination_rows(list(reply.event_destinations)))
    return 0


def _destination_confirm(args: argparse.Namespace) -> int:
    with client_for(args) as client:
        reply = client.feedback.ConfirmConfigurationSetEventDestination(
            cs.ConfirmConfigurationSetEventDestinationRequest(
                configuration_set_name=args.set, event_destination_name=args.name
            )
        )
    emit(args, reply, f"subscription confirmed: {reply.subscription_arn}")
    return 0


def _destination_remove(args: argparse.Namespace) -> int:
    with client_for(args) as client:
        reply = client.feedback.DeleteConfigurationSetEventDestination(
            cs.DeleteConfigurationSetEventDestinationRequest(
                configuration_set_name=args.set, event_destination_name=args.name
            )
        )
    emit(args, reply, f"event destination {args.name} removed from {args.set}")
    return 0


# --- webhook test


def _sample_event() -> ev.Event:
    mail = ev.Mail(
        message_id="0000000000000000-sample",
        source="sender@example.com",
        sending_account_id="sample-account",
        destination=["recipient@example.com"],
        subject="postmesh webhook test",
        configuration_set_name="sample",
    )
    now = dt.datetime.now(dt.UTC)
    mail.timestamp.FromDatetime(now)
    bounce = ev.Bounce(
        bounce_type=ev.BOUNCE_TYPE_PERMANENT,
        bounce_sub_type=ev.BOUNCE_SUB_TYPE_GENERAL,
        bounced_recipients=[
            ev.BouncedRecipient(
                email_address="recipient@example.com",
                action="failed",
                status="5.1.1",
                diagnostic_code="smtp; 550 5.1.1 user unknown",
            )
        ],
        feedback_id="sample-feedback",
        reporting_mta="dsn; postmesh",
    )
    bounce.timestamp.FromDatetime(now)
    return ev.Event(
        event_id="sample-" + now.strftime("%Y%m%d%H%M%S"),
        account_id="sample-account",
        email=ev.EmailEvent(event_type=ev.EMAIL_EVENT_TYPE_BOUNCE, mail=mail, bounce=bounce),
    )


def _webhook_test(args: argparse.Namespace) -> int:
    # The renderer and signer the feedback service uses, so the test is what the endpoint will get.
    from services.feedback.destinations.sesjson import event_json
    from services.feedback.destinations.signing import SIGNATURE_HEADER, new_secret, signature_header

    secret = args.secret or new_secret()
    body = event_json(_sample_event()).encode()
    request = urllib.request.Request(
        args.url,
        data=body,
        method="POST",
        headers={
            "Content-Type": "application/json",
            "User-Agent": "postmesh-webhooks/1 (test)",
            SIGNATURE_HEADER: signature_header(secret, int(time.time()), body),
        },
    )
    if not args.secret:
        print(f"signing secret (generated for this test): {secret}")
    print(f"POST {args.url}\n{body.decode()}")
    try:
        with urllib.request.urlopen(request, timeout=args.timeout) as response:
            status, text = response.status, response.read(4096).decode(errors="replace")
    except urllib.error.HTTPError as exc:
        status, text = exc.code, exc.read(4096).decode(errors="replace")
    except (urllib.error.URLError, OSError) as exc:
        print(f"error: no response: {exc}", file=sys.stderr)
        return 1
    print(f"response: HTTP {status}\n{text}")
    return 0 if 200 <= status < 300 else 1


# --- events follow


def _follow(args: argparse.Namespace) -> int:
    requests: queue.Queue[cs.SubscribeEventsRequest | None] = queue.Queue()
    requests.put(
        cs.SubscribeEventsRequest(
            subscription_name=args.name, event_types=_event_types(args.events) if args.events else []
        )
    )
    printed = 0
    with client_for(args) as client:
        stream = client.feedback.SubscribeEvents(iter(requests.get, None))
        try:
            for response in stream:
                if args.json:
                    print(response.ses_json, flush=True)
                else:
                    email = response.event.email
                    record = json.loads(response.ses_json)
                    print(
                        f"{record['mail']['timestamp']}  {record['eventType']:<17} {email.mail.message_id}  "
                        f"{','.join(email.mail.destination)}",
                        flush=True,
                    )
                requests.put(cs.SubscribeEventsRequest(ack_event_ids=[response.event.event_id]))
                printed += 1
                if args.count and printed >= args.count:
                    break
        except KeyboardInterrupt:
            pass
        finally:
            requests.put(None)
            stream.cancel()
    return 0


# --- admin dead-letters


def _dead_list(args: argparse.Namespace) -> int:
    with client_for(args, admin=True) as client:
        reply = client.feedback.ListDeadLetters(
            cs.ListDeadLettersRequest(
                account_id=args.account, page_size=args.page_size, page_token=args.page_token
            )
        )
    rows = [
        [
            str(d.id),
            d.account_id,
            f"{d.configuration_set_name}/{d.event_destination_name}",
            d.url,
            str(d.attempts),
            d.last_error[:60],
        ]
        for d in reply.dead_letters
    ]
    text = table(rows, ["ID", "ACCOUNT", "DESTINATION", "URL", "ATTEMPTS", "LAST ERROR"])
    if reply.next_page_token:
        text += f"\nnext page: --page-token {reply.next_page_token}"
    emit(args, reply, text)
    return 0


def _dead_replay(args: argparse.Namespace) -> int:
    with client_for(args, admin=True) as client:
        reply = client.feedback.ReplayDeadLetters(
            cs.ReplayDeadLettersRequest(ids=args.ids, all=args.all, account_id=args.account)
        )
    emit(args, reply, f"replayed: {reply.replayed}")
    return 0


def register_admin_commands(admin: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """`postmesh admin dead-letters list|replay` (called where `postmesh admin` is made)."""
    dead = admin.add_parser("dead-letters", help="webhook deliveries that failed for the whole retry period")
    sub = dead.add_subparsers(dest="dead_letters_command", required=True)
    listing = sub.add_parser("list", help="list dead letters")
    listing.add_argument("--account", default="", help="only this account's")
    listing.add_argument("--page-size", type=int, default=0)
    listing.add_argument("--page-token", default="")
    add_connection_flags(listing, admin=True)
    listing.set_defaults(handler=_dead_list)
    replay = sub.add_parser("replay", help="deliver dead letters again (a fresh retry period)")
    replay.add_argument("ids", nargs="*", type=int)
    replay.add_argument("--all", action="store_true", help="every dead letter (of --account, if given)")
    replay.add_argument("--account", default="")
    add_connection_flags(replay, admin=True)
    replay.set_defaults(handler=_dead_replay)


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    config_set = commands.add_parser("config-set", help="configuration sets and their event destinations")
    sub = config_set.add_subparsers(dest="config_set_command", required=True)

    create = sub.add_parser("create", help="create a configuration set")
    create.add_argument("name")
    create.add_argument("--tls-policy", choices=["optional", "require"], default="optional")
    create.add_argument("--max-delivery-seconds", type=int, default=0, help="300 to 50400; 0: the default")
    create.add_argument("--paused", action="store_true", help="create with sending paused")
    create.add_argument("--reputation-metrics", action="store_true")
    create.add_argument(
        "--suppressed-reasons", help="BOUNCE,COMPLAINT, or '' for none (default: the account-level list)"
    )
    create.add_argument(
        "--spam-policy",
        choices=_SPAM_MODES,
        help="the set's own spam policy, judged beside the account's (stricter wins); none: no own policy",
    )
    create.add_argument(
        "--spam-threshold", type=float, default=0.0, help="score for hold/reject; 0: the operator's default"
    )
    add_connection_flags(create)
    create.set_defaults(handler=_create)

    listing = sub.add_parser("list", help="list configuration sets")
    listing.add_argument("--page-size", type=int, default=0)
    listing.add_argument("--page-token", default="")
    add_connection_flags(listing)
    listing.set_defaults(handler=_list)

    update = sub.add_parser("update", help="change a set's options")
    update.add_argument("name")
    pause = update.add_mutually_exclusive_group()
    pause.add_argument("--pause", action="store_true", help="refuse sends naming the set")
    pause.add_argument("--resume", action="store_true")
    update.add_argument("--tls-policy", choices=["optional", "require"])
    update.add_argument("--max-delivery-seconds", type=int, help="300 to 50400; 0: the default")
    update.add_argument("--reputation-metrics", choices=["on", "off"])
    update.add_argument(
        "--suppressed-reasons", help="BOUNCE,COMPLAINT, '' for none, or 'account' for the account-level list"
    )
    update.add_argument("--redirect-domain", help="custom redirect domain for tracking ('' removes it)")
    update.add_argument(
        "--spam-policy",
        choices=_SPAM_MODES,
        help="the set's own spam policy, judged beside the account's (stricter wins); none: no own policy",
    )
    update.add_argument(
        "--spam-threshold", type=float, default=0.0, help="score for hold/reject; 0: the operator's default"
    )
    add_connection_flags(update)
    update.set_defaults(handler=_update)

    for name, handler, text in (
        ("show", _show, "a set's options and destinations"),
        ("delete", _delete, "delete a set"),
    ):
        parser = sub.add_parser(name, help=text)
        parser.add_argument("name")
        add_connection_flags(parser)
        parser.set_defaults(handler=handler)

    destination = sub.add_parser("destination", help="a set's event destinations")
    dsub = destination.add_subparsers(dest="destination_command", required=True)
    add = dsub.add_parser("add", help="add a webhook or NATS subject destination")
    add.add_argument("set")
    add.add_argument("name")
    target = add.add_mutually_exclusive_group(required=True)
    target.add_argument("--webhook", metavar="URL")
    target.add_argument("--nats-subject", metavar="SUBJECT")
    add.add_argument("--events", required=True, help=f"comma-separated: {','.join(_TYPES)}")
    add.add_argument("--format", choices=["json", "sns", "protobuf"], default="json")
    add.add_argument(
        "--signature-version",
        type=int,
        choices=[1, 2],
        default=0,
        help="SNS format: SignatureVersion 1 (SHA1, the default) or 2 (SHA256)",
    )
    add.add_argument("--disabled", action="store_true")
    add_connection_flags(add)
    add.set_defaults(handler=_destination_add)
    dlist = dsub.add_parser("list", help="list a set's destinations")
    dlist.add_argument("set")
    add_connection_flags(dlist)
    dlist.set_defaults(handler=_destination_list)
    confirm = dsub.add_parser(
        "confirm", help="confirm an SNS-format destination's subscription (as its SubscribeURL does)"
    )
    confirm.add_argument("set")
    confirm.add_argument("name")
    add_connection_flags(confirm)
    confirm.set_defaults(handler=_destination_confirm)
    remove = dsub.add_parser("remove", help="remove a destination")
    remove.add_argument("set")
    remove.add_argument("name")
    add_connection_flags(remove)
    remove.set_defaults(handler=_destination_remove)

    webhook = commands.add_parser("webhook", help="webhook tools")
    wsub = webhook.add_subparsers(dest="webhook_command", required=True)
    test = wsub.add_parser("test", help="POST a signed sample event to URL and show the answer")
    test.add_argument("url")
    test.add_argument("--secret", default="", help="the destination's signing secret (default: a new one)")
    test.add_argument("--timeout", type=float, default=10.0)
    test.set_defaults(handler=_webhook_test)


def register_follow(events: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """`postmesh events follow`, under the `events` command of postmesh.cli.events."""
    follow = events.add_parser("follow", help="print events as they happen (a durable subscription)")
    follow.add_argument("--name", default="cli", help="subscription name: resume where it left off")
    follow.add_argument("--events", default="", help="only these types (comma-separated)")
    follow.add_argument("--count", type=int, default=0, help="stop after this many (0: never)")
    add_connection_flags(follow)
    follow.set_defaults(handler=_follow)
