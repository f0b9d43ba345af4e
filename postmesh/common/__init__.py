"""Cross-cutting code shared by every postmesh service."""
