"""Settings of the feedback service (part of the one schema in postmesh.common.config)."""

from postmesh.common.config import Setting, register

register(
    Setting(
        "SUPPRESSION_REASONS",
        str,
        "BOUNCE,COMPLAINT",
        "Events that add a recipient to the account suppression list: BOUNCE, COMPLAINT, both, or none.",
    ),
)

register(
    Setting(
        "EVENT_DESTINATIONS_PER_SET",
        int,
        10,
        "Most event destinations one configuration set may have (SES: 10).",
    ),
    Setting(
        "WEBHOOK_ALLOW_PRIVATE_TARGETS",
        bool,
        False,
        "Allow webhooks to loopback and private (RFC 1918) addresses: for development and tests only.",
    ),
    Setting(
        "WEBHOOK_SECRETS_KEY",
        str,
        "",
        "Base64 AES-256 key sealing webhook signing secrets; empty: a key file kept in DATA_DIR.",
        secret=True,
    ),
    Setting("WEBHOOK_TIMEOUT_SECONDS", float, 10.0, "Longest wait for a webhook endpoint's answer."),
    Setting(
        "WEBHOOK_RETRY_HOURS",
        float,
        24.0,
        "How long a failing webhook delivery is retried before it becomes a dead letter.",
    ),
    Setting(
        "WEBHOOK_BACKOFF_SECONDS",
        float,
        5.0,
        "First retry delay of a failing webhook delivery; it doubles per attempt up to the maximum.",
    ),
    Setting("WEBHOOK_BACKOFF_MAX_SECONDS", float, 3600.0, "Longest delay between two webhook attempts."),
    Setting(
        "WEBHOOK_POLL_SECONDS",
        float,
        1.0,
        "How often the webhook dispatcher looks for deliveries that are due.",
    ),
    Setting(
        "USER_NATS_SUBJECT_PREFIX",
        str,
        "postmesh-user",
        "Prefix of NATS subject destinations: events go to <prefix>.<account id>.<subject>.",
    ),
    Setting(
        "EVENT_SUBSCRIPTION_MAX_UNACKED",
        int,
        1000,
        "Events a SubscribeEvents client may hold unacknowledged before no more are sent.",
    ),
    Setting(
        "EVENT_SUBSCRIPTION_ACK_WAIT_SECONDS",
        float,
        60.0,
        "An event a SubscribeEvents client has not acknowledged within this time is sent again.",
    ),
)
