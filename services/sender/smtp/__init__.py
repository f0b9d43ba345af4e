"""SMTP submission: applications send through postmesh over SMTP, into the same accept path as SendEmail."""
