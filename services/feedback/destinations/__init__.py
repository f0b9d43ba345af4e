"""Event destinations: where an account's events go (webhooks in SES's JSON or Amazon SNS's HTTP/S
format, NATS subjects, the gRPC stream), and the dead letters of webhooks."""
