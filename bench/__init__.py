"""Benchmarks, by concern; run each from the repository root with `python -m bench.<area>.<name>`."""
