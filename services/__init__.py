"""The four postmesh services; each sub-package owns its models, migrations and servicer."""
