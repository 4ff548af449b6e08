"""ingest: see README."""
