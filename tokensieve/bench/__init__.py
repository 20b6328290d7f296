"""Benchmark harness: standard-benchmark loaders and their official scorers live in `datasets`."""
