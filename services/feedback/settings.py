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
        "EVENT_RETENTION_DAYS",
        int,
        14,
        "Days the feedback service keeps email events for GetMessageInsights and ListEmailEvents.",
    ),
    Setting(
        "SUPPRESSION_IMPORT_MAX_BYTES",
        int,
        16 * 1024 * 1024,
        "Largest suppression list file one CreateImportJob accepts (the file travels in the request).",
    ),
)
