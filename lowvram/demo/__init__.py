"""Tiny and synthetic checkpoints and inputs: `lowvram demo`, the tests and the benchmarks."""
