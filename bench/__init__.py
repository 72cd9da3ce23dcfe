"""Benchmarks: `make bench BENCH=<suite>` runs bench/<suite>.py and writes bench/results/<suite>.json."""
