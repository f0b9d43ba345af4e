"""Event destinations: where an account's events go (webhooks, Amazon SNS's HTTP/S format, ...)."""
