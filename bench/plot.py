"""The engine bench's picture: tokens/s against concurrency, one line a system, drawn from its
results file (so it can be redrawn from any recorded run: python -m bench.plot bench/results/engine.json)."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path


def throughput_plot(results: Path, out: Path | None = None) -> Path:
    """Draw results' level rows (rows with a "workload" of their own, e.g. long prompts, are not
    levels) into out (default: the results file's name with .png); written, then renamed."""
    import matplotlib

    matplotlib.use("Agg")   # no display: a file only
    import matplotlib.pyplot as plt

    doc = json.loads(results.read_text())
    series: dict[str, list[tuple[int, float]]] = {}
    for row in doc["rows"]:
        if "workload" not in row:
            series.setdefault(row["system"], []).append((row["concurrency"], row["tok_per_s"]))
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for system, points in series.items():
        if len(points) < 2:
            continue   # a one-level row (the Q4_K_M pair at c1) is in the table, not a line
        xs, ys = zip(*sorted(points))
        ax.plot(xs, ys, marker="o", label=system)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("concurrent requests")
    ax.set_ylabel("output tokens / s")
    m = doc["workload"].get("machine", {})
    ax.set_title(f"{m.get('cpu', '?')}, {m.get('threads', '?')} threads, {m.get('date', '')}")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    out = out or results.with_suffix(".png")
    tmp = out.with_name(f"{out.stem}.tmp{out.suffix}")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, out)
    return out


if __name__ == "__main__":
    print(throughput_plot(Path(sys.argv[1])))
