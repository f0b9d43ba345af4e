"""The SES-compatible HTTP API: SigV4-authenticated SES v2 (REST JSON) and v1 (Query) in front of the mesh."""
