"""Benchmarks: `make bench BENCH=<suite>` runs bench/<suite>.py and writes bench/results/<suite>.json."""
import os as _os

# Same OpenMP setting as the server (see service/__init__.py), for Weft and its peers alike.
_os.environ.setdefault("GOMP_SPINCOUNT", "10000")
