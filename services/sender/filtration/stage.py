"""The scan stage of delivery: one verdict per message, before it is signed.

Virus first (a message with a finding is rejected whatever its spam score), then spam. What is done
is recorded on the message (QueuedMessage.filtration), so a message re-queued for a retry, or held
and released, is not scanned again. A scanner that cannot answer gives DEFER: the worker puts the
message back on the queue to wait (fail-closed); for spam only, SPAM_FAIL_OPEN lets it go unscored.
"""

from __future__ import annotations

import asyncio
import enum
import logging
from dataclasses import dataclass

from prometheus_client import Counter, Gauge

from postmesh.common.config import Settings
from postmesh.events.v1 import events_pb2 as ev
from postmesh.sender.v1 import queue_pb2
from services.sender.filtration.clamd import ClamdClient, ScannerUnavailable
from services.sender.filtration.policy import (
    Action,
    DefaultPolicy,
    PolicySource,
    SpamPolicy,
    judge_strictest,
    set_policy,
)
from services.sender.filtration.rspamd import RspamdClient

log = logging.getLogger(__name__)

SCANS = Counter(
    "postmesh_filtration_scans_total", "Messages scanned, by filter and result", ["filter", "result"]
)
REJECTS = Counter("postmesh_filtration_rejects_total", "Messages rejected as Bad content", ["filter"])
HELD = Counter("postmesh_filtration_held_total", "Messages held for an operator by the spam policy")
DEFERRED = Counter(
    "postmesh_filtration_deferred_total",
    "Messages put back to wait because a scanner was unreachable",
    ["filter"],
)
SCANNER_UP = Gauge(
    "postmesh_filtration_scanner_up", "1 when the last call to the scanner got an answer", ["filter"]
)
HELD_WAITING = Gauge("postmesh_filtration_held_messages", "Messages held for an operator, waiting now")
SPAM_SCORE = Gauge("postmesh_filtration_last_spam_score", "Spam score of the last message scored")

VIRUS = "virus"
SPAM = "spam"
# Names in the standard gRPC health service while a filter is configured.
HEALTH_NAMES = {VIRUS: "postmesh.filtration.virus", SPAM: "postmesh.filtration.spam"}


class Kind(enum.Enum):
    PASS = "pass"
    REJECT = "reject"
    HOLD = "hold"
    DEFER = "defer"


@dataclass(frozen=True)
class Verdict:
    kind: Kind
    filtration: ev.Filtration
    filter: str = ""
    details: str = ""


class ContentFilters:
    def __init__(
        self,
        *,
        clamd: ClamdClient | None,
        rspamd: RspamdClient | None,
        policies: PolicySource,
        spam_fail_open: bool = False,
        spam_threshold: float = SpamPolicy().threshold,
    ) -> None:
        self.clamd = clamd
        self.rspamd = rspamd
        self.policies = policies
        self.spam_fail_open = spam_fail_open
        # A configuration set's threshold 0 means the operator's SPAM_THRESHOLD.
        self.spam_threshold = spam_threshold
        # Last known state of each scanner; `changed` wakes whoever reports it (health).
        self.up: dict[str, bool] = {}
        self.changed = asyncio.Event()
        for name, client in ((VIRUS, clamd), (SPAM, rspamd)):
            if client is not None:
                self._set_up(name, True)

    def _set_up(self, name: str, up: bool) -> None:
        SCANNER_UP.labels(name).set(1 if up else 0)
        if self.up.get(name) != up:
            self.up[name] = up
            self.changed.set()

    @classmethod
    def from_settings(cls, settings: Settings, policies: PolicySource | None = None) -> ContentFilters | None:
        """The filters the settings turn on, or None when neither scanner is configured."""
        clamd = (
            ClamdClient(settings.clamd_url, timeout=settings.clamd_timeout_seconds)
            if settings.clamd_url
            else None
        )
        rspamd = (
            RspamdClient(settings.rspamd_url, timeout=settings.rspamd_timeout_seconds)
            if settings.rspamd_url
            else None
        )
        if clamd is None and rspamd is None:
            return None
        return cls(
            clamd=clamd,
            rspamd=rspamd,
            policies=policies or DefaultPolicy.from_settings(settings),
            spam_fail_open=settings.spam_fail_open,
            spam_threshold=settings.spam_threshold,
        )

    def describe(self) -> list[str]:
        active = []
        if self.clamd is not None:
            active.append(f"virus scanning with clamd at {self.clamd.endpoint}")
        if self.rspamd is not None:
            active.append(f"spam scoring with rspamd at {self.rspamd.endpoint}")
        return active

    async def probe(self) -> dict[str, bool]:
        """Asks each scanner whether it is up (for the metrics, between messages)."""
        states = {}
        for name, client in ((VIRUS, self.clamd), (SPAM, self.rspamd)):
            if client is not None:
                states[name] = await client.ping()
                self._set_up(name, states[name])
                if not states[name]:
                    log.warning("content scanner unreachable", extra={"filter": name})
        return states

    def pending(self, queued: queue_pb2.QueuedMessage) -> bool:
        """Whether the message still has a scan to go through."""
        done = queued.filtration
        return (self.clamd is not None and not done.virus_scanned) or (
            self.rspamd is not None and not (done.spam_scored or done.spam_unscanned)
        )

    async def check(self, queued: queue_pb2.QueuedMessage, mime: bytes) -> Verdict:
        found = ev.Filtration()
        found.CopyFrom(queued.filtration)
        if self.clamd is not None and not found.virus_scanned:
            try:
                signature = await self.clamd.scan(mime)
            except ScannerUnavailable as exc:
                return self._unavailable(VIRUS, found, str(exc))
            self._set_up(VIRUS, True)
            found.virus_scanned = True
            SCANS.labels(VIRUS, "found" if signature else "clean").inc()
            if signature:
                REJECTS.labels(VIRUS).inc()
                return Verdict(Kind.REJECT, found, VIRUS, f"virus: {signature}")
        if self.rspamd is not None and not (found.spam_scored or found.spam_unscanned):
            policies = [await self.policies.spam_policy(queued.account_id, queued.configuration_set_name)]
            own = set_policy(queued.set_spam_policy, queued.configuration_set_name, self.spam_threshold)
            if own is not None:
                policies.append(own)
            if any(p.scores for p in policies):
                try:
                    result = await self.rspamd.check(
                        mime,
                        sender=queued.from_address,
                        recipients=list(queued.recipients),
                        queue_id=queued.message_id,
                    )
                except ScannerUnavailable as exc:
                    if not self.spam_fail_open:
                        return self._unavailable(SPAM, found, str(exc))
                    self._set_up(SPAM, False)
                    SCANS.labels(SPAM, "skipped").inc()
                    log.warning(
                        "rspamd unreachable; sending unscored (SPAM_FAIL_OPEN)", extra={"error": str(exc)}
                    )
                    found.spam_unscanned = True
                    return Verdict(Kind.PASS, found)
                self._set_up(SPAM, True)
                SPAM_SCORE.set(result.score)
                found.spam_scored = True
                found.spam_score = result.score
                found.spam_action = result.action
                action, policy = judge_strictest(result.score, policies)
                SCANS.labels(SPAM, action.value).inc()
                details = ""
                if policy is not None:
                    whose = f" of {policy.source}" if policy.source else ""
                    details = (
                        f"spam: score {result.score:g} above the {action.value} threshold"
                        f" {policy.threshold:g}{whose}"
                    )
                if action is Action.REJECT:
                    REJECTS.labels(SPAM).inc()
                    return Verdict(Kind.REJECT, found, SPAM, details)
                if action is Action.HOLD:
                    HELD.inc()
                    return Verdict(Kind.HOLD, found, SPAM, details)
        return Verdict(Kind.PASS, found)

    def _unavailable(self, name: str, found: ev.Filtration, why: str) -> Verdict:
        self._set_up(name, False)
        DEFERRED.labels(name).inc()
        SCANS.labels(name, "unavailable").inc()
        log.warning(
            "scanner unreachable; the message waits in the queue", extra={"filter": name, "error": why}
        )
        scanner = "virus scanner" if name == VIRUS else "spam scanner"
        return Verdict(Kind.DEFER, found, name, f"{scanner} unavailable: {why}")
