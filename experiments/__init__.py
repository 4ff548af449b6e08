"""Probes that informed a decision, kept so each can be rerun: ``python -m experiments.<name>.<script>`` from the
repository root. Not installed with the package; see experiments/README.md."""
