"""Open and click tracking: the HTTP endpoint tracked URLs point at, and the events it records."""
