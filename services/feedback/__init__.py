"""postmesh feedback service."""
