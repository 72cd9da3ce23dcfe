"""Shared bits of the benchmark suites: percentiles, result files, tables."""
from __future__ import annotations

import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).parent / "results"


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    k = (len(s) - 1) * q / 100
    lo, hi = int(k), min(int(k) + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def throughput_row(system: str, conc: int, items: list, wall: float, ttfts: list[float],
                   tpots: list[float]) -> dict:
    """One level's row: `items` (each with max_tokens) served in `wall` seconds."""
    tokens = sum(i.max_tokens for i in items)
    return {
        "system": system, "concurrency": conc, "requests": len(items), "output_tokens": tokens,
        "tok_per_s": tokens / wall, "ttft_p50_ms": 1000 * percentile(ttfts, 50),
        "ttft_p99_ms": 1000 * percentile(ttfts, 99), "tpot_ms": 1000 * median(tpots),
    }


def _cpu_model() -> str:
    """The CPU's model name: ratios move with it (MKL's sgemm, say, is far slower on AMD parts)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> dict:
    return {
        "cpu": _cpu_model(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "date": time.strftime("%Y-%m-%d"),
    }


def write_results(suite: str, workload: dict, rows: list[dict], ratios: dict[str, float], command: str) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{suite}.json"
    doc = {"workload": {**workload, "machine": machine(), "command": command}, "rows": rows,
           "ratios": {k: round(v, 3) for k, v in ratios.items()}}
    # Write, then rename: a run killed half-way leaves the previous results whole.
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(doc, indent=2) + "\n")
    os.replace(tmp, path)
    return path


def print_table(rows: list[dict]) -> None:
    if not rows:
        return
    cols = list(dict.fromkeys(k for r in rows for k in r))  # every column any row has, in order
    fmt = lambda v: f"{v:.3g}" if isinstance(v, float) else str(v)  # noqa: E731
    widths = {c: max(len(c), *(len(fmt(r.get(c, ""))) for r in rows)) for c in cols}
    print(" | ".join(c.ljust(widths[c]) for c in cols))
    print("-|-".join("-" * widths[c] for c in cols))
    for r in rows:
        print(" | ".join(fmt(r.get(c, "")).ljust(widths[c]) for c in cols))
