"""Benchmarks of lrsafety against plain baselines; run them with ``python -m benchmarks.run_all``."""
