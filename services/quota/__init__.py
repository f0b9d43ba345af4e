"""postmesh quota service."""
