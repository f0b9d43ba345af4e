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
    Setting(
        "QUOTA_LEASE_SECONDS",
        float,
        0.2,
        "Largest lease of send quota a sender replica may hold, in seconds of the account's rate.",
    ),
    Setting(
        "PRODUCTION_ACCESS_AUTO_APPROVE_MAX_VOLUME",
        int,
        0,
        "Grant production access at once when the expected daily volume is at most this, the request "
        "has a website and a use case, and the account is healthy; 0 disables auto-approval.",
    ),
    Setting(
        "REPUTATION_WINDOW_DAYS",
        float,
        14.0,
        "Reputation is judged on at most this many days of sending (and never before a reinstatement).",
    ),
    Setting(
        "REPUTATION_WINDOW_MESSAGES",
        int,
        0,
        "If > 0, reputation is judged on the most recent sending until this many messages are covered.",
    ),
    Setting(
        "REPUTATION_MIN_VOLUME",
        int,
        200,
        "Messages that must be in the reputation window before rates are judged.",
    ),
    Setting("REPUTATION_BOUNCE_REVIEW_RATE", float, 0.05, "Bounce rate that puts an account under review."),
    Setting("REPUTATION_BOUNCE_PAUSE_RATE", float, 0.10, "Bounce rate that pauses an account's sending."),
    Setting(
        "REPUTATION_COMPLAINT_REVIEW_RATE", float, 0.001, "Complaint rate that puts an account under review."
    ),
    Setting(
        "REPUTATION_COMPLAINT_PAUSE_RATE", float, 0.005, "Complaint rate that pauses an account's sending."
    ),
    Setting(
        "REPUTATION_EVALUATION_SECONDS",
        float,
        5.0,
        "How often the accounts whose sending statistics changed are judged against the review and "
        "pause thresholds.",
    ),
    Setting(
        "NOTIFICATION_FROM_ADDRESS",
        str,
        "no-reply@postmesh.test",
        "From address of notices to accounts about their sending state; use the system identity's domain "
        "(that of VERIFICATION_MAIL_FROM) so they are DKIM-signed.",
    ),
    Setting(
        "QUOTA_AUTO_INCREASE_INTERVAL_SECONDS",
        float,
        3600.0,
        "How often production accounts are considered for an automatic quota increase; 0 disables it.",
    ),
    Setting(
        "QUOTA_AUTO_INCREASE_USAGE",
        float,
        0.8,
        "Share of the 24-hour quota an account must have used to qualify for an automatic increase.",
    ),
    Setting(
        "QUOTA_AUTO_INCREASE_MIN_AGE_SECONDS",
        float,
        86400.0,
        "Time since an account's last quota change before it may be raised automatically again.",
    ),
    Setting(
        "QUOTA_AUTO_INCREASE_MAX_24_HOUR_SEND",
        float,
        1000000.0,
        "Ceiling of automatic increases of the 24-hour quota.",
    ),
    Setting(
        "QUOTA_AUTO_INCREASE_MAX_SEND_RATE", float, 500.0, "Ceiling of automatic increases of the send rate."
    ),
)
