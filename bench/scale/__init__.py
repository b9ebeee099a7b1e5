"""Scale benchmarks: tune per trial, torchrun, an unreachable server; the scale curve."""
