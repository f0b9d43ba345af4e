"""What a piece of returned mail says, whatever its format: the parsers' common result."""

from __future__ import annotations

import datetime as dt
import enum
from dataclasses import dataclass, field


class Kind(enum.Enum):
    BOUNCE = "bounce"
    COMPLAINT = "complaint"
    # Nothing a sender must act on (a delay notice, a relayed notice, plain mail) or unreadable.
    NONE = "none"


@dataclass
class Recipient:
    address: str
    action: str = "failed"
    status: str = ""
    diagnostic_code: str = ""
    remote_mta: str = ""


@dataclass
class Report:
    kind: Kind
    # Which parser understood it: dsn, arf, auto-reply, postfix, exim, qmail... or none.
    format: str
    recipients: list[Recipient] = field(default_factory=list)
    reporting_mta: str = ""
    # Auto-replies are Transient/General whatever their text says.
    auto_reply: bool = False
    feedback_type: str = ""
    user_agent: str = ""
    arrival_date: dt.datetime | None = None
    # What the report quotes of the original message, for mapping it.
    original_message_id: str = ""
    original_return_path: str = ""
    # Why a report is kind NONE.
    reason: str = ""
