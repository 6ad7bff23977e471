"""Benchmarks against the raw-driver floor (run as ``python -m bench.<name>``)."""
