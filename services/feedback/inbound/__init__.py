"""Mail that comes back: the inbound SMTP listener at the bounce domains and the feedback-loop
address, the parsers of what arrives (DSNs, other MTAs' bounces, auto-replies, ARF complaints), the
mapping to the message they are about, and the reports kept when nothing maps."""
