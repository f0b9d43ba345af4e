"""Settings of the quota service (part of the one schema in postmesh.common.config)."""

from postmesh.common.config import Setting, register

register(
    Setting(
        "SANDBOX_MAX_24_HOUR_SEND",
        float,
        200.0,
        "Messages per rolling 24 hours for an account in the sandbox.",
    ),
    Setting("SANDBOX_MAX_SEND_RATE", float, 1.0, "Messages per second for an account in the sandbox."),
    Setting(
        "PRODUCTION_MAX_24_HOUR_SEND",
        float,
        50000.0,
        "Messages per rolling 24 hours when production access is granted.",
    ),
    Setting(
        "PRODUCTION_MAX_SEND_RATE", float, 14.0, "Messages per second when production access is granted."
    ),
)
