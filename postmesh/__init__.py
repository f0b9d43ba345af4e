"""postmesh: a self-hostable email sending platform."""
