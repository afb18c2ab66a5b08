"""Benchmarks, each run as `python -m bench.<name>`; bench.replay needs no cluster and no GPU."""
