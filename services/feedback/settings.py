"""Settings of the feedback service (part of the one schema in postmesh.common.config)."""

from postmesh.common.config import Setting, register
from postmesh.common.verp import DEFAULT_BOUNCE_DOMAIN, VERP_SECRET

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
    Setting(
        "SNS_HTTPS_LISTEN",
        str,
        "127.0.0.1:8443",
        "Address of feedback's HTTPS server for SNS-format destinations (certificate, SubscribeURL, "
        "UnsubscribeURL); empty disables it.",
    ),
    Setting(
        "SNS_CERT_HOST",
        str,
        "localhost",
        "Host name of SigningCertURL and of the self-signed certificate; consumers must trust it.",
    ),
    Setting(
        "SNS_PUBLIC_URL",
        str,
        "",
        "https base URL of the SNS endpoint as subscribers reach it; empty: https://SNS_CERT_HOST:port.",
    ),
    Setting(
        "SNS_CERT_FILE",
        str,
        "",
        "PEM certificate (and chain) for SNS signatures and the SNS endpoint; empty: self-signed, kept "
        "in DATA_DIR/sns.",
    ),
    Setting("SNS_KEY_FILE", str, "", "PEM RSA private key of SNS_CERT_FILE.", secret=True),
    Setting(
        "SNS_REGION", str, "postmesh", "Region part of SNS-format TopicArns: arn:postmesh:sns:REGION:..."
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
    DEFAULT_BOUNCE_DOMAIN,
    VERP_SECRET,
    Setting(
        "INBOUND_SMTP_LISTEN",
        str,
        "127.0.0.1:2525",
        "host:port of the SMTP listener for bounces and complaints (the bounce domains' MX); empty: off.",
    ),
    Setting("INBOUND_HOSTNAME", str, "", "Name the inbound listener gives in its greeting; empty: the FQDN."),
    Setting(
        "FEEDBACK_LOOP_ADDRESS",
        str,
        "",
        "Address enrolled with providers' complaint feedback loops; empty: fbl@DEFAULT_BOUNCE_DOMAIN.",
    ),
    Setting(
        "INBOUND_MAX_MESSAGE_BYTES",
        int,
        10 * 1024 * 1024,
        "Largest report the inbound listener takes; larger ones are refused with 552.",
    ),
    Setting("INBOUND_MAX_CONNECTIONS", int, 100, "Inbound SMTP connections at once; more are told 421."),
    Setting(
        "INBOUND_MAX_CONNECTIONS_PER_CLIENT",
        int,
        20,
        "Inbound SMTP connections at once from one client IP address; more are told 421. 0: no limit.",
    ),
    Setting(
        "INBOUND_TLS_CERT_FILE", str, "", "PEM certificate (chain) for STARTTLS; empty: a self-signed one."
    ),
    Setting("INBOUND_TLS_KEY_FILE", str, "", "PEM private key of INBOUND_TLS_CERT_FILE (if not in it)."),
    Setting(
        "FEEDBACK_NOTICE_FROM",
        str,
        "",
        "From address of forwarded bounce and complaint notices; empty: MAILER-DAEMON@ the system identity.",
    ),
    Setting(
        "SENT_MESSAGE_INDEX_DAYS",
        float,
        30.0,
        "How long the feedback service remembers a sent message, to map reports about it.",
    ),
    Setting(
        "KEPT_REPORT_DAYS",
        float,
        30.0,
        "How long returned mail that mapped to nothing is kept for operators.",
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
