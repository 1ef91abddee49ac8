"""cli: see the module map in the README."""
