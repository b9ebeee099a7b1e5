"""Spark benchmarks: batch scoring and two-process training on local[2]."""
