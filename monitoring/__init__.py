"""monitoring: see README."""
