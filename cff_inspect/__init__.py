"""Command-line entry point of the streaming visual inspection system."""
