"""Benchmarks: each module runs as `python -m bench.<name> --out bench/results/<name>.json`.

Speeds are reported as ratios against a baseline measured in the same run on the same data.
"""
