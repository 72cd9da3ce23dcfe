"""make bench BENCH=lora: a batch mixing 8 LoRA adapters (rank 16, every projection) against the
same workload on the base model alone, in one run (A-B-B-A order, so that a machine getting
slower or faster over the run weighs on both sides alike), and the time to load an adapter.

The adapters are random PEFT adapters written for the model at bench time (nothing is
downloaded). Prefix caching is off: the workload's prompts share text, and the base model
would reuse KV across requests that the adapters (rightly) may not.

Usage: python -m bench lora [--model PATH] [--adapters 8] [--rank 16] [--concurrency 32] [--requests 64]
"""
from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
from pathlib import Path

import torch

from bench.common import print_table, throughput_row, write_results
from bench.engine import weft_level
from bench.workload import make_workload
from service.config import EngineConfig
from service.engine.async_engine import AsyncEngine
from service.engine.core import EngineCore

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def make_adapters(hf_dir: Path, out: Path, count: int, rank: int) -> list[Path]:
    """`count` random PEFT adapters for the model at hf_dir (one PEFT model, re-randomised)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32),
                           LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=TARGETS))
    paths = []
    for i in range(count):
        torch.manual_seed(i)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_" in name:
                    p.copy_(torch.randn_like(p) * 0.02)
        model.save_pretrained(out / f"a{i}")
        paths.append(out / f"a{i}")
    return paths


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="bench lora")
    ap.add_argument("--model", default=None)
    ap.add_argument("--adapters", type=int, default=8)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--requests", type=int, default=64)
    a = ap.parse_args(argv)
    core = EngineCore(EngineConfig(model=a.model, enable_lora=True, max_loras=a.adapters, max_lora_rank=a.rank,
                                   enable_prefix_caching=False, kv_cache_gb=2.0))
    items = make_workload(core.tokenizer, a.requests, seed=a.concurrency)
    load_s = []
    with tempfile.TemporaryDirectory() as tmp:
        for path in make_adapters(core.loaded.hf_dir, Path(tmp), a.adapters, a.rank):
            weights, seconds = core.read_adapter(path.name, str(path))
            core.add_adapter(weights, seconds)
            load_s.append(seconds)
    names = [f"a{i % a.adapters}" for i in range(len(items))]

    async def run() -> list[dict]:
        engine = AsyncEngine(core)
        rows = []
        try:
            await weft_level(engine, items[:2], 2, names[:2])   # warm-up, adapters resident
            for label, loras in (("base", None), ("mixed", names), ("mixed", names), ("base", None)):
                wall, ttfts, tpots = await weft_level(engine, items, a.concurrency, loras)
                rows.append({**throughput_row(f"weft {label}", a.concurrency, items, wall, ttfts, tpots),
                             "adapters": a.adapters if loras else 0})
                print_table(rows[-1:])
        finally:
            await engine.shutdown()
        return rows

    rows = asyncio.run(run())
    base = statistics.mean(r["tok_per_s"] for r in rows if r["adapters"] == 0)
    mixed = statistics.mean(r["tok_per_s"] for r in rows if r["adapters"])
    ratios = {f"lora_mixed_vs_base_c{a.concurrency}": mixed / base,
              "adapter_load_ms_p50": 1000 * statistics.median(load_s)}
    print()
    print_table(rows)
    print(ratios)
    workload = {"prompt_tokens": 100, "output_tokens": "16-256 spread", "greedy": True, "dtype": "float32",
                "adapters": a.adapters, "rank": a.rank, "targets": "q,k,v,o,gate,up,down",
                "concurrency": a.concurrency, "requests": a.requests, "prefix_caching": False,
                "order": "base, mixed, mixed, base", "model": str(core.loaded.source)}
    cmd = "make bench BENCH=lora" + (f" ARGS='{' '.join(argv)}'" if argv else "")
    print(f"wrote {write_results('lora', workload, rows, ratios, cmd)}")
    return 0
