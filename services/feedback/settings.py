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
