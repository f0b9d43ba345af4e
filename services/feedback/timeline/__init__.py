"""Email events users can read without NATS: stored per account, a message's timeline, recent events."""
