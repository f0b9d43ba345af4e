"""Settings of the content filters (part of the one schema in postmesh.common.config)."""

from postmesh.common.config import Setting, register

SPAM_POLICIES = ("off", "tag", "hold", "reject")

register(
    Setting(
        "CLAMD_URL",
        str,
        "",
        "clamd to scan every outgoing message with (tcp://host:port or unix:///path); empty: no virus scan.",
    ),
    Setting("CLAMD_TIMEOUT_SECONDS", float, 60.0, "Longest wait for clamd's verdict on one message."),
    Setting(
        "CLAMD_STREAM_MAX_BYTES",
        int,
        50 * 1024 * 1024,
        "clamd's StreamMaxLength: a longer message is rejected as Heuristics.Limits.Exceeded unscanned.",
    ),
    Setting(
        "RSPAMD_URL",
        str,
        "",
        "rspamd normal worker to spam-score outgoing mail with (http://host:11333); empty: no spam scoring.",
    ),
    Setting("RSPAMD_TIMEOUT_SECONDS", float, 30.0, "Longest wait for rspamd's score of one message."),
    Setting(
        "SPAM_POLICY",
        str,
        "tag",
        "What a spam score above SPAM_THRESHOLD does: off (not scored), tag (recorded only), hold, reject.",
    ),
    Setting("SPAM_THRESHOLD", float, 15.0, "rspamd score above which SPAM_POLICY hold or reject applies."),
    Setting(
        "SPAM_FAIL_OPEN",
        bool,
        False,
        "rspamd unreachable: send unscored (flagged on the events) instead of waiting. Never for viruses.",
    ),
    Setting(
        "SCAN_RETRY_BASE_SECONDS",
        float,
        30.0,
        "Wait before scanning again when a scanner is unreachable; doubles per attempt.",
    ),
    Setting("SCAN_RETRY_MAX_SECONDS", float, 600.0, "Longest wait between two scans of a waiting message."),
)
