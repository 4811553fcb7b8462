"""Benchmarks of the strategies, each run as ``python -m benchmarks.bench_<name>`` from the repository root.

Every benchmark drives its measured runs through :mod:`benchmarks.runner` (a fresh subprocess per run of a
job in :mod:`benchmarks.jobs`, JSON results back), records with :mod:`benchmarks.tracing` and reports with
:mod:`benchmarks.results`.
"""
