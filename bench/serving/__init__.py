"""Serving benchmarks: the deployable in process and served, MLflow's floor, a load generator."""
