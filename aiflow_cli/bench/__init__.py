"""Benchmarks: each measures aiflow against a baseline in the same run and prints ratios."""
