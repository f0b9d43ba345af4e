"""postmesh sender service."""
