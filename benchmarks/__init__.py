"""Reproducible performance figures for trioserve (``python -m benchmarks.<name>``)."""
