"""Settings of the identity service (part of the one schema in postmesh.common.config)."""

from postmesh.common.config import Setting, register

register(
    Setting(
        "DKIM_MASTER_KEYS",
        str,
        "",
        "Master keys encrypting DKIM private keys: `id:base64(32 bytes)`, comma-separated, the first "
        "current (the rest only decrypt until `postmesh identity rewrap-keys`). Required by identity.",
        secret=True,
    ),
    # Shared with the delivery workers' MX look-ups (same names and text: whichever registers first).
    Setting(
        "DNS_RESOLVER",
        str,
        "",
        "host:port of the DNS resolver for identity checks and MX look-ups; empty: the system's.",
    ),
    Setting("DNS_TIMEOUT_SECONDS", float, 5.0, "How long one DNS look-up may take."),
    Setting(
        "DNS_CHECK_POLL_SECONDS",
        float,
        10.0,
        "How often the identity checker looks for identities whose DNS check is due.",
    ),
    Setting(
        "DNS_CHECK_INITIAL_SECONDS",
        float,
        60.0,
        "First retry delay of a pending or failing DNS check; doubles on each miss.",
    ),
    Setting(
        "DNS_CHECK_MAX_SECONDS", float, 3600.0, "Longest delay between DNS checks of an unverified identity."
    ),
    Setting(
        "DNS_RECHECK_SECONDS",
        float,
        3600.0,
        "How often a verified domain's records are checked again (gone: the domain fails, signing stops).",
    ),
    Setting(
        "DOMAIN_VERIFICATION_HOURS",
        float,
        72.0,
        "How long a new domain stays PENDING waiting for its records before it is FAILED.",
    ),
    Setting(
        "VERIFICATION_MAIL_FROM",
        str,
        "no-reply@postmesh.test",
        "From address of verification messages; its domain is the system identity (operator publishes it).",
    ),
    Setting(
        "VERIFICATION_TOKEN_HOURS", float, 24.0, "How long the link in a verification message stays valid."
    ),
    Setting(
        "VERIFICATION_RESEND_SECONDS",
        float,
        60.0,
        "Minimum time between two verification messages to the same address identity.",
    ),
    Setting(
        "IDENTITY_HTTP_LISTEN",
        str,
        "127.0.0.1:8090",
        "Address of identity's HTTP server for verification links; empty disables it.",
    ),
    Setting(
        "IDENTITY_PUBLIC_URL",
        str,
        "",
        "Base URL of verification links as users reach it; empty: http://IDENTITY_HTTP_LISTEN.",
    ),
    Setting(
        "MAIL_FROM_MX_HOST",
        str,
        "feedback-smtp.postmesh.test",
        "The host custom MAIL FROM domains must point their MX record at (where bounces arrive).",
    ),
    Setting(
        "FEEDBACK_FORWARDING_DEFAULT",
        bool,
        True,
        "Email feedback forwarding of identities that never set it (SES: on): notices go to the sender.",
    ),
    Setting(
        "MAIL_FROM_SPF",
        str,
        "v=spf1 include:spf.postmesh.test ~all",
        "The SPF TXT record custom MAIL FROM domains are told to publish.",
    ),
)
