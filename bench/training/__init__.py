"""Training benchmarks: epoch cost, threads, the choice of net, checkpoint retention."""
