"""Benchmark scripts (each also runs as `python benchmarks/<name>.py`).

`python -m benchmarks.gpu_suite` is the one-command GPU check (docs/gpu_suite.md).
"""
