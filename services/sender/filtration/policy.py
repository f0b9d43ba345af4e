"""Spam policy as data, and the pure function that judges a score against it."""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from postmesh.common.config import Settings
from postmesh.sender.v1 import filtration_pb2
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
    # Whose policy it is, when not the account's: "configuration set <name>" (said in a verdict).
    source: str = ""

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


_SEVERITY = {Action.PASS: 0, Action.HOLD: 1, Action.REJECT: 2}


def judge_strictest(score: float, policies: Sequence[SpamPolicy]) -> tuple[Action, SpamPolicy | None]:
    """The most severe verdict of the policies, and the policy that gave it (None: pass). A message is
    judged by its account's policy and by its configuration set's: a set can tighten, never loosen."""
    verdict: tuple[Action, SpamPolicy | None] = (Action.PASS, None)
    for policy in policies:
        action = judge_spam(score, policy)
        if _SEVERITY[action] > _SEVERITY[verdict[0]]:
            verdict = (action, policy)
    return verdict


def set_policy(
    policy: filtration_pb2.SpamPolicy, set_name: str, default_threshold: float
) -> SpamPolicy | None:
    """The configuration set's own policy as the message carries it (copied at accept); None if none."""
    if policy.mode == filtration_pb2.SPAM_POLICY_MODE_UNSPECIFIED:
        return None
    try:
        mode = filtration_pb2.SpamPolicyMode.Name(policy.mode).removeprefix("SPAM_POLICY_MODE_").lower()
        return SpamPolicy(mode, policy.threshold or default_threshold, f"configuration set {set_name}")
    except ValueError:  # a mode this worker does not know: the account's policy alone
        return None


class PolicySource(Protocol):
    """Where an account's spam policy comes from: the account's own or the operator's default. A
    configuration set's policy travels on the message (QueuedMessage.set_spam_policy)."""

    async def spam_policy(self, account_id: str, configuration_set: str) -> SpamPolicy: ...


class DefaultPolicy:
    def __init__(self, policy: SpamPolicy) -> None:
        self.policy = policy

    @classmethod
    def from_settings(cls, settings: Settings) -> DefaultPolicy:
        return cls(SpamPolicy(settings.spam_policy.strip().lower(), settings.spam_threshold))

    async def spam_policy(self, account_id: str, configuration_set: str) -> SpamPolicy:
        return self.policy
