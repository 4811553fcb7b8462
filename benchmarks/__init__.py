"""Benchmarks of the strategies, and the subprocess harness they share with the examples."""
