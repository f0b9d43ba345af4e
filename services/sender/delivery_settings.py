"""Settings of the sender's delivery workers (part of the one schema in postmesh.common.config)."""

from postmesh.common.config import Setting, register
from postmesh.common.verp import DEFAULT_BOUNCE_DOMAIN, VERP_SECRET

DELIVERY_MODES = ("mx", "smarthost", "sink")
SMARTHOST_TLS_MODES = ("none", "opportunistic", "starttls", "tls")

register(
    VERP_SECRET,
    Setting(
        "DELIVERY_WORKERS",
        int,
        16,
        "Messages one sender replica delivers at once; 0: this replica only accepts (no delivery).",
    ),
    Setting(
        "DELIVERY_MODE",
        str,
        "sink",
        "mx (deliver to each domain's MX), smarthost (relay through SMARTHOST), sink (.eml files "
        "under DATA_DIR/mail).",
    ),
    Setting(
        "DELIVERY_ACK_WAIT_SECONDS",
        float,
        60.0,
        "A message whose worker stops reporting progress this long is redelivered to another worker.",
    ),
    DEFAULT_BOUNCE_DOMAIN,
    Setting(
        "RETRY_BASE_MINUTES", float, 5.0, "Wait before the second delivery attempt; doubles per attempt."
    ),
    Setting("RETRY_MAX_MINUTES", float, 240.0, "Longest wait between two delivery attempts."),
    Setting(
        "DELIVERY_MAX_AGE_HOURS",
        float,
        24.0,
        "Time-to-live of a message that carries no expire time: then remaining recipients bounce.",
    ),
    # Shared with identity's DNS checks (same names, same meaning: whichever registers first).
    Setting(
        "DNS_RESOLVER",
        str,
        "",
        "host:port of the DNS resolver for identity checks and MX look-ups; empty: the system's.",
    ),
    Setting("DNS_TIMEOUT_SECONDS", float, 5.0, "How long one DNS look-up may take."),
    Setting("SMTP_PORT", int, 25, "Port of the receiving MX servers (25 on the Internet)."),
    Setting("SMTP_HELO_NAME", str, "", "Name the workers give in EHLO; empty: this host's FQDN."),
    Setting("SMTP_TIMEOUT_SECONDS", float, 60.0, "Longest wait for a connection or an SMTP reply."),
    Setting(
        "SMTP_TLS_VERIFY",
        bool,
        False,
        "Check the receiving server's certificate (MX TLS is opportunistic and unverified by default).",
    ),
    Setting(
        "SMTP_MAX_CONNECTIONS_PER_HOST",
        int,
        16,
        "Connections one replica opens to one receiving server at most; idle ones are reused.",
    ),
    Setting("SMARTHOST", str, "", "host:port of the SMTP relay used when DELIVERY_MODE=smarthost."),
    Setting("SMARTHOST_USERNAME", str, "", "AUTH user name at the smarthost; empty: no AUTH."),
    Setting("SMARTHOST_PASSWORD", str, "", "AUTH password at the smarthost.", secret=True),
    Setting(
        "SMARTHOST_TLS",
        str,
        "opportunistic",
        "TLS to the smarthost: none, opportunistic (STARTTLS if offered), starttls (required), tls.",
    ),
)
