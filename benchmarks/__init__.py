"""melle_bench: the latency and quality benchmarks (``benchmarks/``), importable as a package.

``latency.py`` and ``quality.py`` are also run as scripts from the repository root.
"""
