"""Settings of the feedback service (part of the one schema in postmesh.common.config)."""

from postmesh.common.config import Setting, register

register(
    Setting(
        "SUPPRESSION_REASONS",
        str,
        "BOUNCE,COMPLAINT",
        "Events that add a recipient to the account suppression list: BOUNCE, COMPLAINT, both, or none.",
    ),
    Setting(
        "TRACKING_TRUST_FORWARDED_FOR",
        bool,
        False,
        "Record the last X-Forwarded-For address as an open or click's IP (behind an Ingress or proxy).",
    ),
)
