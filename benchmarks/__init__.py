"""benchmarks: see README."""
