"""Spam policy as data, and the pure function that judges a score against it."""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Protocol

from postmesh.common.config import Settings
from services.sender.filtration.settings import SPAM_POLICIES


class Action(enum.Enum):
    PASS = "pass"
    HOLD = "hold"
    REJECT = "reject"


@dataclass(frozen=True)
class SpamPolicy:
    # off: not scored; tag: scored and recorded (Postal's default); hold / reject above threshold.
    mode: str = "tag"
    threshold: float = 15.0

    def __post_init__(self) -> None:
        if self.mode not in SPAM_POLICIES:
            raise ValueError(f"spam policy {self.mode!r}: choose one of {', '.join(SPAM_POLICIES)}")

    @property
    def scores(self) -> bool:
        return self.mode != "off"


def judge_spam(score: float, policy: SpamPolicy) -> Action:
    if policy.mode == "hold" and score > policy.threshold:
        return Action.HOLD
    if policy.mode == "reject" and score > policy.threshold:
        return Action.REJECT
    return Action.PASS


class PolicySource(Protocol):
    """Where an account's spam policy comes from. The configuration-set branch adds per-set policies
    by answering from the set named on the message; today every account has the operator's default."""

    async def spam_policy(self, account_id: str, configuration_set: str) -> SpamPolicy: ...


class DefaultPolicy:
    def __init__(self, policy: SpamPolicy) -> None:
        self.policy = policy

    @classmethod
    def from_settings(cls, settings: Settings) -> DefaultPolicy:
        return cls(SpamPolicy(settings.spam_policy.strip().lower(), settings.spam_threshold))

    async def spam_policy(self, account_id: str, configuration_set: str) -> SpamPolicy:
        return self.policy
