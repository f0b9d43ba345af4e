"""Sending authorization policies in SES's JSON format: validation and evaluation.

A policy lets other accounts send from an identity:

    {"Version": "2012-10-17",
     "Statement": [{"Sid": "AllowTeamB", "Effect": "Allow",
                    "Principal": {"AWS": ["123456789012"]},
                    "Action": ["ses:SendEmail", "ses:SendRawEmail"]}]}

Principals are account ids (or `arn:...:<account id>:root`). A matching Deny wins over any Allow.
Conditions are refused rather than ignored, so a policy never grants more than it says.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from postmesh.common.errors import InvalidArgument

MAX_POLICY_BYTES = 4096
MAX_POLICIES = 20
SENDING_ACTIONS = frozenset(
    {
        "ses:sendemail",
        "ses:sendrawemail",
        "ses:sendtemplatedemail",
        "ses:sendbulkemail",
        "ses:sendbulktemplatedemail",
        "ses:*",
    }
)
_POLICY_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_ACCOUNT = re.compile(r"^(?:arn:[^:]*:iam::)?(\d{12})(?::root)?$")


@dataclass(frozen=True)
class Statement:
    allow: bool
    accounts: frozenset[str]


def check_policy_name(name: str) -> str:
    if not _POLICY_NAME.match(name):
        raise InvalidArgument(
            "policy_name must be 1 to 64 letters, digits, dashes or underscores.", field="policy_name"
        )
    return name


def _strings(value: Any, what: str) -> list[str]:
    items = value if isinstance(value, list) else [value]
    if not items or not all(isinstance(i, str) for i in items):
        raise InvalidArgument(f"Policy {what} must be a string or a list of strings.", field="policy")
    return items


def parse_policy(text: str) -> list[Statement]:
    """The policy's statements; INVALID_ARGUMENT (field policy) saying what is wrong otherwise."""
    if len(text.encode()) > MAX_POLICY_BYTES:
        raise InvalidArgument(f"A policy may be at most {MAX_POLICY_BYTES} bytes.", field="policy")
    try:
        document = json.loads(text)
    except ValueError:
        raise InvalidArgument("The policy is not valid JSON.", field="policy") from None
    if not isinstance(document, dict):
        raise InvalidArgument("The policy must be a JSON object.", field="policy")
    raw_statements = document.get("Statement")
    if isinstance(raw_statements, dict):
        raw_statements = [raw_statements]
    if not isinstance(raw_statements, list) or not raw_statements:
        raise InvalidArgument("The policy needs a non-empty Statement list.", field="policy")
    statements = []
    for raw in raw_statements:
        if not isinstance(raw, dict):
            raise InvalidArgument("Each policy statement must be an object.", field="policy")
        if "Condition" in raw:
            raise InvalidArgument("Policy conditions are not supported.", field="policy")
        effect = raw.get("Effect")
        if effect not in ("Allow", "Deny"):
            raise InvalidArgument("Statement Effect must be Allow or Deny.", field="policy")
        principal = raw.get("Principal")
        if not isinstance(principal, dict) or "AWS" not in principal:
            raise InvalidArgument('Statement Principal must be {"AWS": [account ids]}.', field="policy")
        accounts = set()
        for item in _strings(principal["AWS"], "principals"):
            match = _ACCOUNT.match(item.strip())
            if not match:
                raise InvalidArgument(f"Principal {item!r} is not an account id.", field="policy")
            accounts.add(match.group(1))
        actions = {a.lower() for a in _strings(raw.get("Action"), "Action")}
        unknown = actions - SENDING_ACTIONS
        if unknown:
            raise InvalidArgument(
                f"Unsupported action(s) {sorted(unknown)}: use ses:SendEmail or ses:SendRawEmail.",
                field="policy",
            )
        statements.append(Statement(effect == "Allow", frozenset(accounts)))
    return statements


def authorizes(policies: list[str], account_id: str) -> bool:
    """Whether the stored policies let `account_id` send: some Allow names it and no Deny does."""
    allowed = False
    for text in policies:
        for statement in parse_policy(text):
            if account_id in statement.accounts:
                if not statement.allow:
                    return False
                allowed = True
    return allowed
