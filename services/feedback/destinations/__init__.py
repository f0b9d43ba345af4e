"""Where a configuration set's events go: webhooks, NATS subjects, the gRPC stream, dead letters."""
