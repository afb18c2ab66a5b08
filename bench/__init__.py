"""Benchmarks that need no cluster: `python -m bench.replay`."""
