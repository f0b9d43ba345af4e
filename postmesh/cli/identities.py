"""`postmesh identity ...`: verified addresses and domains, DKIM, MAIL FROM, sending authorization."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterable
from pathlib import Path

from postmesh.cli.common import add_connection_flags, client_for, emit, table
from postmesh.client import Client
from postmesh.identity.v1 import identity_pb2 as pb

KEY_LENGTHS: dict[int, pb.DkimSigningKeyLength.ValueType] = {
    1024: pb.DKIM_SIGNING_KEY_LENGTH_RSA_1024_BIT,
    2048: pb.DKIM_SIGNING_KEY_LENGTH_RSA_2048_BIT,
}


def _key_length(bits: int | None) -> pb.DkimSigningKeyLength.ValueType:
    return KEY_LENGTHS.get(bits or 0, pb.DKIM_SIGNING_KEY_LENGTH_UNSPECIFIED)


def _quoted(value: str) -> str:
    # A TXT string holds at most 255 characters: longer values are several strings on one line.
    pieces = [value[i : i + 255] for i in range(0, len(value), 255)] or [""]
    return " ".join('"' + p.replace("\\", "\\\\").replace('"', '\\"') + '"' for p in pieces)


def zone_snippet(records: Iterable[pb.DnsRecord], ttl: int = 3600) -> str:
    """The records as zone-file lines a user can paste."""
    lines = []
    for record in records:
        if record.type == "TXT":
            value = _quoted(record.value)
        elif record.type in ("MX", "CNAME"):
            value = record.value.rstrip(".") + "."
        else:
            value = record.value
        lines.append(f"{record.name}.\t{ttl}\tIN\t{record.type}\t{value}")
    return "\n".join(lines)


def _name(enum: object, value: int, prefix: str) -> str:
    return str(enum.Name(value)).removeprefix(prefix)  # type: ignore[attr-defined]


def _status(value: int) -> str:
    return _name(pb.VerificationStatus, value, "VERIFICATION_STATUS_")


def _records_text(records: Iterable[pb.DnsRecord]) -> str:
    records = list(records)
    if not records:
        return ""
    missing = [r for r in records if not r.found]
    header = "; DNS records to publish" + (
        f" ({len(missing)} not found at the last check)" if missing else " (all found)"
    )
    return f"\n{header}\n{zone_snippet(records)}"


def describe(reply: pb.GetEmailIdentityResponse) -> str:
    kind = _name(pb.IdentityType, reply.identity_type, "IDENTITY_TYPE_")
    lines = [
        f"identity:      {reply.email_identity} ({kind})",
        f"verification:  {_status(reply.verification_status)}"
        + ("  (verified for sending)" if reply.verified_for_sending_status else ""),
    ]
    info = reply.verification_info
    if info.error_message:
        lines.append(f"last error:    {info.error_message}")
    if info.HasField("expire_timestamp") and reply.identity_type == pb.IDENTITY_TYPE_EMAIL_ADDRESS:
        lines.append(f"link expires:  {info.expire_timestamp.ToJsonString()}")
    if reply.identity_type == pb.IDENTITY_TYPE_DOMAIN:
        dkim = reply.dkim_attributes
        origin = _name(
            pb.DkimSigningAttributesOrigin, dkim.signing_attributes_origin, "DKIM_SIGNING_ATTRIBUTES_ORIGIN_"
        )
        lines.append(
            f"dkim:          {_status(dkim.status)}, signing {'on' if dkim.signing_enabled else 'off'}, "
            f"{origin}"
        )
        for key in dkim.keys:
            lines.append(
                f"  {key.selector:<16} {key.algorithm:<15} {key.key_bits:>5} bits  {key.state:<8}"
                f" {'found' if key.found else 'not found'}"
            )
        mail_from = reply.mail_from_attributes
        if mail_from.mail_from_domain:
            status = _name(
                pb.MailFromDomainStatus, mail_from.mail_from_domain_status, "MAIL_FROM_DOMAIN_STATUS_"
            )
            behavior = _name(
                pb.BehaviorOnMxFailure, mail_from.behavior_on_mx_failure, "BEHAVIOR_ON_MX_FAILURE_"
            )
            lines.append(f"mail from:     {mail_from.mail_from_domain} {status} (on MX failure: {behavior})")
    if reply.policies:
        lines.append(f"policies:      {', '.join(sorted(reply.policies))}")
    return "\n".join(lines) + _records_text(reply.dns_records)


def _dkim_attributes(args: argparse.Namespace) -> pb.DkimSigningAttributes:
    attributes = pb.DkimSigningAttributes(
        include_ed25519=getattr(args, "ed25519", False),
        next_signing_key_length=_key_length(getattr(args, "key_length", 0)),
    )
    key_file = getattr(args, "private_key_file", None)
    if key_file:
        attributes.domain_signing_private_key = Path(key_file).read_text()
        attributes.domain_signing_selector = args.selector or ""
    return attributes


def _create(args: argparse.Namespace) -> int:
    with client_for(args) as client:
        reply = client.identity.CreateEmailIdentity(
            pb.CreateEmailIdentityRequest(
                email_identity=args.identity, dkim_signing_attributes=_dkim_attributes(args)
            )
        )
    if reply.identity_type == pb.IDENTITY_TYPE_EMAIL_ADDRESS:
        text = f"created {reply.email_identity}: " + (
            "verified (its domain is verified)."
            if reply.verified_for_sending_status
            else "a verification message is on its way; open its link, or run "
            "`postmesh identity confirm TOKEN`."
        )
    else:
        text = (
            f"created {reply.email_identity}: publish these records, then `postmesh identity check "
            f"{reply.email_identity}` (postmesh also checks by itself)." + _records_text(reply.dns_records)
        )
    emit(args, reply, text)
    return 0


def _get(args: argparse.Namespace) -> int:
    with client_for(args) as client:
        reply = client.identity.GetEmailIdentity(pb.GetEmailIdentityRequest(email_identity=args.identity))
    emit(args, reply, describe(reply))
    return 0


def _check(args: argparse.Namespace) -> int:
    with client_for(args) as client:
        reply = client.identity.CheckEmailIdentityVerification(
            pb.CheckEmailIdentityVerificationRequest(email_identity=args.identity)
        )
    emit(args, reply, describe(reply.identity))
    return 0


def _list(args: argparse.Namespace) -> int:
    with client_for(args) as client:
        reply = client.identity.ListEmailIdentities(
            pb.ListEmailIdentitiesRequest(page_size=args.page_size, page_token=args.page_token)
        )
    rows = [
        [
            i.identity_name,
            _name(pb.IdentityType, i.identity_type, "IDENTITY_TYPE_"),
            _status(i.verification_status),
            "yes" if i.sending_enabled else "no",
        ]
        for i in reply.email_identities
    ]
    text = table(rows, ["IDENTITY", "TYPE", "STATUS", "SENDING"])
    if reply.next_page_token:
        text += f"\nnext page: --page-token {reply.next_page_token}"
    emit(args, reply, text)
    return 0


def _delete(args: argparse.Namespace) -> int:
    with client_for(args) as client:
        reply = client.identity.DeleteEmailIdentity(
            pb.DeleteEmailIdentityRequest(email_identity=args.identity)
        )
    emit(args, reply, f"deleted {args.identity}")
    return 0


def _confirm(args: argparse.Namespace) -> int:
    # Public: the token is the credential, no API key needed.
    with Client(endpoint=args.endpoint, api_key="") as client:
        reply = client.identity.ConfirmEmailIdentity(pb.ConfirmEmailIdentityRequest(token=args.token))
    emit(args, reply, f"verified {reply.email_identity}")
    return 0


def _resend(args: argparse.Namespace) -> int:
    with client_for(args) as client:
        reply = client.identity.ResendVerificationEmail(
            pb.ResendVerificationEmailRequest(email_identity=args.identity)
        )
    emit(args, reply, f"verification message queued; its link expires {reply.expire_time.ToJsonString()}")
    return 0


def _dkim_rotate(args: argparse.Namespace) -> int:
    with client_for(args) as client:
        reply = client.identity.RotateEmailIdentityDkimKeys(
            pb.RotateEmailIdentityDkimKeysRequest(
                email_identity=args.identity, next_signing_key_length=_key_length(args.key_length)
            )
        )
    emit(
        args,
        reply,
        "new keys made; they sign (and the current ones stop) once their records are found."
        + _records_text(reply.dns_records),
    )
    return 0


def _dkim_signing(args: argparse.Namespace) -> int:
    with client_for(args) as client:
        reply = client.identity.PutEmailIdentityDkimAttributes(
            pb.PutEmailIdentityDkimAttributesRequest(
                email_identity=args.identity, signing_enabled=args.state == "on"
            )
        )
    emit(args, reply, f"DKIM signing {args.state} for {args.identity}")
    return 0


def _dkim_keys(args: argparse.Namespace) -> int:
    origin = (
        pb.DKIM_SIGNING_ATTRIBUTES_ORIGIN_EXTERNAL
        if args.private_key_file
        else pb.DKIM_SIGNING_ATTRIBUTES_ORIGIN_POSTMESH
    )
    with client_for(args) as client:
        reply = client.identity.PutEmailIdentityDkimSigningAttributes(
            pb.PutEmailIdentityDkimSigningAttributesRequest(
                email_identity=args.identity,
                signing_attributes_origin=origin,
                signing_attributes=_dkim_attributes(args),
            )
        )
    emit(args, reply, f"DKIM {_status(reply.dkim_status)}" + _records_text(reply.dns_records))
    return 0


def _feedback(args: argparse.Namespace) -> int:
    with client_for(args) as client:
        reply = client.identity.PutEmailIdentityFeedbackAttributes(
            pb.PutEmailIdentityFeedbackAttributesRequest(
                email_identity=args.identity, email_forwarding_enabled=args.state == "on"
            )
        )
    emit(args, reply, f"feedback forwarding {args.state} for {args.identity}")
    return 0


def _mail_from(args: argparse.Namespace) -> int:
    behavior = (
        pb.BEHAVIOR_ON_MX_FAILURE_REJECT_MESSAGE
        if args.reject_on_mx_failure
        else pb.BEHAVIOR_ON_MX_FAILURE_USE_DEFAULT_VALUE
    )
    with client_for(args) as client:
        reply = client.identity.PutEmailIdentityMailFromAttributes(
            pb.PutEmailIdentityMailFromAttributesRequest(
                email_identity=args.identity,
                mail_from_domain=args.mail_from_domain,
                behavior_on_mx_failure=behavior,
            )
        )
    text = (
        f"MAIL FROM {reply.mail_from_attributes.mail_from_domain}" + _records_text(reply.dns_records)
        if args.mail_from_domain
        else "custom MAIL FROM removed"
    )
    emit(args, reply, text)
    return 0


def _policy_put(args: argparse.Namespace) -> int:
    text = sys.stdin.read() if args.file == "-" else Path(args.file).read_text()
    with client_for(args) as client:
        reply = client.identity.PutEmailIdentityPolicy(
            pb.PutEmailIdentityPolicyRequest(email_identity=args.identity, policy_name=args.name, policy=text)
        )
    emit(args, reply, f"policy {args.name} set on {args.identity}")
    return 0


def _policy_list(args: argparse.Namespace) -> int:
    with client_for(args) as client:
        reply = client.identity.GetEmailIdentityPolicies(
            pb.GetEmailIdentityPoliciesRequest(email_identity=args.identity)
        )
    emit(args, reply, "\n\n".join(f"# {name}\n{text}" for name, text in sorted(reply.policies.items())))
    return 0


def _policy_delete(args: argparse.Namespace) -> int:
    with client_for(args) as client:
        reply = client.identity.DeleteEmailIdentityPolicy(
            pb.DeleteEmailIdentityPolicyRequest(email_identity=args.identity, policy_name=args.name)
        )
    emit(args, reply, f"policy {args.name} deleted from {args.identity}")
    return 0


def _rewrap(args: argparse.Namespace) -> int:
    with client_for(args, admin=True) as client:
        reply = client.identity.RewrapDkimKeys(pb.RewrapDkimKeysRequest())
    emit(
        args,
        reply,
        f"{reply.rewrapped} DKIM data keys re-encrypted under {reply.master_key_id} "
        f"({reply.already_current} already were). Older master keys may now be removed.",
    )
    return 0


def _system(args: argparse.Namespace) -> int:
    with client_for(args, admin=True) as client:
        reply = client.identity.GetSystemEmailIdentity(pb.GetSystemEmailIdentityRequest())
    emit(args, reply, f"system sender: {reply.system_address}\n" + describe(reply.identity))
    return 0


def _new_master_key(args: argparse.Namespace) -> int:
    from services.identity.dkimkeys import MasterKeys

    print(MasterKeys.generate(args.key_id))
    return 0


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    identity = commands.add_parser("identity", help="verified email addresses and domains, DKIM, MAIL FROM")
    sub = identity.add_subparsers(dest="identity_command", required=True)

    def command(name: str, handler: object, text: str, *, admin: bool = False) -> argparse.ArgumentParser:
        parser = sub.add_parser(name, help=text, description=text)
        add_connection_flags(parser, admin=admin)
        parser.set_defaults(handler=handler)
        return parser

    create = command("create", _create, "start verifying an address (a message is sent) or a domain (DNS)")
    create.add_argument("identity", help="an email address or a domain")
    create.add_argument("--ed25519", action="store_true", help="also make an ed25519 DKIM key (RFC 8463)")
    create.add_argument("--key-length", type=int, choices=sorted(KEY_LENGTHS), help="RSA key length (2048)")
    create.add_argument("--selector", help="BYODKIM: the selector of your own key")
    create.add_argument("--private-key-file", help="BYODKIM: your private key (PEM)")

    for name, handler, text in (
        ("get", _get, "an identity's status and the DNS records to publish"),
        ("check", _check, "check a domain's DNS records now"),
        ("delete", _delete, "delete an identity"),
        ("resend", _resend, "send a new verification message to a pending address"),
    ):
        command(name, handler, text).add_argument("identity")

    listing = command("list", _list, "the account's identities")
    listing.add_argument("--page-size", type=int, default=0)
    listing.add_argument("--page-token", default="")

    confirm = sub.add_parser(
        "confirm", help="confirm an address with the token from its verification message"
    )
    confirm.add_argument("token")
    confirm.add_argument(
        "--endpoint", help="host:port of postmesh (default: $POSTMESH_ENDPOINT or localhost:50051)"
    )
    confirm.add_argument("--json", action="store_true", help="print the raw response as JSON")
    confirm.set_defaults(handler=_confirm)

    rotate = command(
        "dkim-rotate", _dkim_rotate, "make new Easy DKIM keys; they replace the current ones once published"
    )
    rotate.add_argument("identity")
    rotate.add_argument("--key-length", type=int, choices=sorted(KEY_LENGTHS))

    signing = command("dkim-signing", _dkim_signing, "turn DKIM signing on or off for a domain")
    signing.add_argument("identity")
    signing.add_argument("state", choices=["on", "off"])

    keys = command(
        "dkim-keys", _dkim_keys, "switch to your own DKIM key (--private-key-file), or back to Easy DKIM"
    )
    keys.add_argument("identity")
    keys.add_argument("--selector")
    keys.add_argument("--private-key-file")
    keys.add_argument("--ed25519", action="store_true")
    keys.add_argument("--key-length", type=int, choices=sorted(KEY_LENGTHS))

    mail_from = command("mail-from", _mail_from, "set a custom MAIL FROM subdomain ('' removes it)")
    mail_from.add_argument("identity")
    mail_from.add_argument("mail_from_domain")
    mail_from.add_argument(
        "--reject-on-mx-failure",
        action="store_true",
        help="refuse to send while the MX record is not verified",
    )

    feedback = command(
        "feedback", _feedback, "email feedback forwarding: bounce and complaint notices mailed to the sender"
    )
    feedback.add_argument("identity")
    feedback.add_argument("state", choices=["on", "off"])

    policy = sub.add_parser("policy", help="sending authorization policies")
    policy_sub = policy.add_subparsers(dest="policy_command", required=True)
    put = policy_sub.add_parser("put", help="set a policy from a JSON file ('-': stdin)")
    put.add_argument("identity")
    put.add_argument("name")
    put.add_argument("file")
    add_connection_flags(put)
    put.set_defaults(handler=_policy_put)
    plist = policy_sub.add_parser("list", help="an identity's policies")
    plist.add_argument("identity")
    add_connection_flags(plist)
    plist.set_defaults(handler=_policy_list)
    pdelete = policy_sub.add_parser("delete", help="delete a policy")
    pdelete.add_argument("identity")
    pdelete.add_argument("name")
    add_connection_flags(pdelete)
    pdelete.set_defaults(handler=_policy_delete)

    command(
        "rewrap-keys",
        _rewrap,
        "re-encrypt DKIM keys under the first DKIM_MASTER_KEYS key (operator)",
        admin=True,
    )
    command("system", _system, "the system sender identity and its DNS records (operator)", admin=True)
    new_key = sub.add_parser("new-master-key", help="print a new DKIM_MASTER_KEYS entry (id:key)")
    new_key.add_argument("--key-id", default=None)
    new_key.set_defaults(handler=_new_master_key)
