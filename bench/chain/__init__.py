"""Chain benchmarks: `main` end to end, logging a model, starting a tracking server."""
