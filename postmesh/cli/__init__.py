"""The postmesh command line."""
