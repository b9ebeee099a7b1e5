"""Benchmarks by concern, each run from the repository root: `python -m bench.<area>.<name>`."""
