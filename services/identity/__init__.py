"""postmesh identity service."""
