"""Settings of the SMTP submission server (part of the one schema in postmesh.common.config)."""

from postmesh.common.config import Setting, register

register(
    Setting(
        "SMTP_STARTTLS_LISTEN",
        str,
        "",
        "host:port list (comma-separated) of SMTP submission with STARTTLS, e.g. 0.0.0.0:587,0.0.0.0:2587; "
        "empty: none (`postmesh dev`: 127.0.0.1:2587).",
    ),
    Setting(
        "SMTP_TLS_LISTEN",
        str,
        "",
        "host:port list of SMTP submission over implicit TLS, e.g. 0.0.0.0:465,0.0.0.0:2465; "
        "empty: none (`postmesh dev`: 127.0.0.1:2465).",
    ),
    Setting(
        "SMTP_TLS_CERT_FILE", str, "", "PEM certificate chain of the SMTP server; reloaded when it changes."
    ),
    Setting("SMTP_TLS_KEY_FILE", str, "", "PEM private key of the SMTP server; reloaded when it changes."),
    Setting(
        "SMTP_TLS_RELOAD_SECONDS",
        float,
        30.0,
        "How often the SMTP server checks its certificate files for changes.",
    ),
    Setting(
        "SMTP_HOSTNAME", str, "", "Name in the SMTP greeting and EHLO reply; empty: this machine's FQDN."
    ),
    Setting("SMTP_MAX_CONNECTIONS", int, 1000, "SMTP connections open at once per process; more get 421."),
    Setting(
        "SMTP_MAX_CONNECTIONS_PER_CLIENT",
        int,
        50,
        "SMTP connections open at once from one client IP address.",
    ),
    Setting(
        "SMTP_MAX_MESSAGES_PER_CONNECTION", int, 1000, "Messages one SMTP connection may send (then 452)."
    ),
    Setting(
        "SMTP_MAX_RECIPIENTS_PER_CONNECTION",
        int,
        10000,
        "Recipients one SMTP connection may name (then 452).",
    ),
    Setting(
        "SMTP_MAX_AUTH_FAILURES", int, 3, "Failed AUTH attempts after which an SMTP connection is closed."
    ),
    Setting(
        "SMTP_COMMAND_TIMEOUT_SECONDS",
        float,
        300.0,
        "Idle time between SMTP commands before the connection is cut.",
    ),
    Setting(
        "SMTP_DATA_TIMEOUT_SECONDS",
        float,
        600.0,
        "Longest time a client may take to send one message's DATA.",
    ),
)
