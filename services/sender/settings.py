"""Settings of the sender service's accept path (part of the one schema in postmesh.common.config)."""

from postmesh.common.config import Setting, register

register(
    Setting(
        "MESSAGE_ID_DOMAIN",
        str,
        "",
        "Domain of the Message-ID header of sent mail (<id@domain>); empty: the From address's domain.",
    ),
    Setting(
        "SIMULATOR_DOMAIN",
        str,
        "simulator.postmesh.test",
        "Domain of the mailbox simulator (success@, bounce@, ooto@, complaint@...); empty: no simulator.",
    ),
    Setting(
        "SEND_MAX_IN_FLIGHT",
        int,
        500,
        "Messages SendEmail and SendBulkEmail may be accepting at once in one process; past it a send "
        "is refused at once with UNAVAILABLE (SERVER_BUSY) and a retry delay (0: no limit).",
    ),
    Setting(
        "SEND_REQUEST_CLAIM_SECONDS",
        float,
        60.0,
        "How long a retry with the same request_id waits for a first call that never finished.",
    ),
)
