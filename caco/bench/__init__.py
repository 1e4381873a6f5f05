"""Benchmarks behind ``python launch/benchmark.py bench=<name>``; each returns a flat dict."""
