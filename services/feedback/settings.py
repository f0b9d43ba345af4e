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
)
