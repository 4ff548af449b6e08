"""workers: see README."""
