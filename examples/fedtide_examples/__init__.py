"""Examples of extending fedtide from your own package (see docs/extending.md)."""
