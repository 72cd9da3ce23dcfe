"""A batched decode step's time with float32 against bf16 KV blocks (--kv-cache-dtype), the rest
of the engine as `--dtype` sets it: `--batch` requests of the engine bench's workload (~100-token
prompts) decoding together, the median of `--steps` consecutive `EngineCore.step` calls after the
prefills, each arm twice, interleaved, in one process. An ablation of one setting, so no peer:
the engine bench compares Weft with llama.cpp and transformers.

Usage: python -m bench kv_dtype [--dtype bfloat16] [--batch 32] [--steps 120] [--reps 2]
Writes bench/results/kv_dtype.json.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time

from bench.common import print_table, write_results
from bench.workload import make_workload
from decoding.sampling import SamplingParams
from service.config import EngineConfig
from service.engine.core import EngineCore

KV_DTYPES = ("float32", "bfloat16")


def _median_step_ms(core: EngineCore, batch: int, steps: int, seed: int) -> float:
    """Median ms of `steps` decode steps of `batch` requests started together (prefill excluded:
    the first steps, until every request has its first token, are not timed)."""
    params = SamplingParams(temperature=0, max_tokens=steps + 30, ignore_eos=True)
    for i, item in enumerate(make_workload(core.tokenizer, batch, seed=seed)):
        core.add_request(f"{seed}-{i}", item.prompt_ids, params)
    for _ in range(5):   # prefill chunks (a step's budget holds ~10 prompts), then decodes
        core.step()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        core.step()
        times.append(time.perf_counter() - start)
    while core.has_unfinished():
        core.step()
    return statistics.median(times) * 1e3


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench kv_dtype")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--steps", type=int, default=120)
    ap.add_argument("--reps", type=int, default=2)
    args = ap.parse_args(argv)
    cores = {kv: EngineCore(EngineConfig(dtype=args.dtype, kv_cache_dtype=kv, kv_cache_gb=2.0, progress=False))
             for kv in KV_DTYPES}
    measured: dict[str, list[float]] = {kv: [] for kv in KV_DTYPES}
    for rep in range(args.reps):
        for kv in KV_DTYPES:
            measured[kv].append(_median_step_ms(cores[kv], args.batch, args.steps, seed=100 + rep))
    rows = [{"kv_cache_dtype": kv, "step_ms": min(ms), "step_ms_runs": [round(m, 2) for m in ms],
             "tok_per_s": args.batch / min(ms) * 1e3} for kv, ms in measured.items()]
    print_table(rows)
    ratio = min(measured["float32"]) / min(measured["bfloat16"])
    path = write_results("kv_dtype", {"dtype": args.dtype, "batch": args.batch, "steps": args.steps,
                                      "reps": args.reps}, rows, {"step_speedup_bf16_kv": ratio},
                         "python -m bench kv_dtype " + " ".join(argv))
    print(f"bf16 KV step speedup {ratio:.3f}; wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
