"""The mailbox simulator, as SES has it: addresses at SIMULATOR_DOMAIN never leave the mesh. The
delivery workers answer for them with the events a real mailbox provider would cause, marked
`simulated` so that statistics, reputation and the suppression list leave them out.

  success@            Delivery
  bounce@             Permanent/General bounce: 550 5.1.1 user unknown
  ooto@               Delivery, then a Transient/General bounce (an out-of-office auto-reply)
  complaint@          Delivery, then a Complaint (abuse)
  suppressionlist@    Permanent/OnAccountSuppressionList bounce, as if the address were suppressed

A `+label` is ignored (success+signup@... is success@...), so one address can be told from another.
Any other address at the simulator domain does not exist: a Permanent/General bounce, as bounce@.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from postmesh.common.addresses import address_key
from postmesh.events.v1 import events_pb2 as ev


class Scenario(enum.Enum):
    SUCCESS = "success"
    BOUNCE = "bounce"
    OOTO = "ooto"
    COMPLAINT = "complaint"
    SUPPRESSION_LIST = "suppressionlist"


@dataclass(frozen=True)
class SimulatedBounce:
    bounce_type: ev.BounceType.ValueType
    sub_type: ev.BounceSubType.ValueType
    status: str
    diagnostic_code: str


USER_UNKNOWN = SimulatedBounce(
    ev.BOUNCE_TYPE_PERMANENT, ev.BOUNCE_SUB_TYPE_GENERAL, "5.1.1", "smtp; 550 5.1.1 user unknown"
)
AUTO_REPLY = SimulatedBounce(
    ev.BOUNCE_TYPE_TRANSIENT,
    ev.BOUNCE_SUB_TYPE_GENERAL,
    "",
    "auto-reply; Out of office: the recipient is away and will read your message on return",
)
ON_SUPPRESSION_LIST = SimulatedBounce(
    ev.BOUNCE_TYPE_PERMANENT,
    ev.BOUNCE_SUB_TYPE_ON_ACCOUNT_SUPPRESSION_LIST,
    "5.1.1",
    "postmesh mailbox simulator: the address is treated as on the account suppression list.",
)


@dataclass(frozen=True)
class Simulation:
    """What happens to mail for one simulator address, in order: delivered first, then what follows."""

    delivered: bool
    bounce: SimulatedBounce | None = None
    complaint: bool = False


SIMULATIONS = {
    Scenario.SUCCESS: Simulation(delivered=True),
    Scenario.BOUNCE: Simulation(delivered=False, bounce=USER_UNKNOWN),
    Scenario.OOTO: Simulation(delivered=True, bounce=AUTO_REPLY),
    Scenario.COMPLAINT: Simulation(delivered=True, complaint=True),
    Scenario.SUPPRESSION_LIST: Simulation(delivered=False, bounce=ON_SUPPRESSION_LIST),
}
NO_SUCH_MAILBOX = Simulation(delivered=False, bounce=USER_UNKNOWN)


class MailboxSimulator:
    def __init__(self, domain: str) -> None:
        self.domain = domain.strip().lower().rstrip(".")

    def handles(self, address: str) -> bool:
        """Whether the address is the simulator's (its domain, compared case-insensitively)."""
        if not self.domain:
            return False
        return address_key(address).rpartition("@")[2] == self.domain

    def simulation(self, address: str) -> Simulation:
        local = address_key(address).rpartition("@")[0].partition("+")[0]
        try:
            return SIMULATIONS[Scenario(local)]
        except ValueError:
            return NO_SUCH_MAILBOX
