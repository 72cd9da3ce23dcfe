"""make bench BENCH=engine: Weft vs transformers generate (static batches, same dtype) and, when
llama-cpp-python is installed, llama.cpp on the same GGUF — one workload, one run.

Usage: python -m bench engine [--model PATH] [--dtype bfloat16|float32] [--levels 1,8,32] [--requests-per-level K]
"""
from __future__ import annotations

import argparse
import asyncio
import time

import torch

from bench.common import median, percentile, print_table, write_results
from bench.workload import Item, make_workload
from decoding.sampling import SamplingParams
from service.config import EngineConfig
from service.engine.async_engine import AsyncEngine
from service.engine.core import EngineCore


def _row(system: str, conc: int, items: list[Item], wall: float, ttfts: list[float], tpots: list[float]) -> dict:
    tokens = sum(i.max_tokens for i in items)
    return {
        "system": system, "concurrency": conc, "requests": len(items), "output_tokens": tokens,
        "tok_per_s": tokens / wall, "ttft_p50_ms": 1000 * percentile(ttfts, 50),
        "ttft_p99_ms": 1000 * percentile(ttfts, 99), "tpot_ms": 1000 * median(tpots),
    }


async def _weft_level(engine: AsyncEngine, items: list[Item], conc: int, loras: list[str | None] | None = None,
                      ) -> tuple[float, list[float], list[float]]:
    """Closed loop at concurrency `conc`; item i runs with LoRA adapter loras[i] when given."""
    sem = asyncio.Semaphore(conc)
    ttfts: list[float] = []
    tpots: list[float] = []

    async def one(item: Item, lora: str | None) -> None:
        async with sem:
            params = SamplingParams(temperature=0, max_tokens=item.max_tokens, ignore_eos=True)
            t0 = time.perf_counter()
            first = None
            n = 0
            async for out in engine.generate(item.prompt_ids, params, lora=lora):
                if out.token_ids and first is None:
                    first = time.perf_counter()
                n += len(out.token_ids)
            end = time.perf_counter()
            assert n == item.max_tokens, (n, item.max_tokens)
            ttfts.append(first - t0)
            tpots.append((end - first) / max(1, n - 1))

    t0 = time.perf_counter()
    await asyncio.gather(*(one(i, loras[k] if loras else None) for k, i in enumerate(items)))
    return time.perf_counter() - t0, ttfts, tpots


def bench_weft(core: EngineCore, workloads: dict[int, list[Item]]) -> list[dict]:
    async def run() -> list[dict]:
        engine = AsyncEngine(core)
        rows = []
        try:
            await _weft_level(engine, workloads[1][:1], 1)  # warm-up
            for conc, items in workloads.items():
                wall, ttfts, tpots = await _weft_level(engine, items, conc)
                rows.append(_row("weft", conc, items, wall, ttfts, tpots))
                print_table(rows[-1:])
        finally:
            await engine.shutdown()
        return rows

    return asyncio.run(run())


class _FirstToken:
    """A logits processor that only records when the first decoding step happens."""

    def __init__(self) -> None:
        self.t: float | None = None

    def __call__(self, input_ids, scores):
        if self.t is None:
            self.t = time.perf_counter()
        return scores


@torch.inference_mode()
def bench_transformers(hf_dir, dtype: torch.dtype, workloads: dict[int, list[Item]]) -> list[dict]:
    from transformers import AutoModelForCausalLM, LogitsProcessorList

    model = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=dtype).eval()
    model.generation_config.pad_token_id = model.generation_config.pad_token_id or 0

    def run_batch(batch: list[Item]) -> tuple[float, float]:
        ids = torch.tensor([i.prompt_ids for i in batch])  # equal lengths: no padding needed
        first = _FirstToken()
        t0 = time.perf_counter()
        # Static batching: every row runs until the longest request of the batch is done.
        model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                       max_new_tokens=max(i.max_tokens for i in batch), min_new_tokens=max(i.max_tokens for i in batch),
                       logits_processor=LogitsProcessorList([first]))
        return t0, first.t

    run_batch(workloads[1][:1])  # warm-up
    rows = []
    for conc, items in workloads.items():
        ttfts, tpots = [], []
        start = time.perf_counter()
        for b in range(0, len(items), conc):
            batch = items[b:b + conc]
            t0, first = run_batch(batch)
            end = time.perf_counter()
            longest = max(i.max_tokens for i in batch)
            for _ in batch:
                # From the batch's start: its clients send when the previous batch has answered
                # (closed loop, like Weft's clients, whose time waiting for a slot is not counted).
                ttfts.append(first - t0)
                tpots.append((end - first) / max(1, longest - 1))
        rows.append(_row("transformers", conc, items, time.perf_counter() - start, ttfts, tpots))
        print_table(rows[-1:])
    return rows


def bench_llamacpp(gguf_path, workloads: dict[int, list[Item]]) -> list[dict]:
    try:
        from llama_cpp import Llama
    except ImportError:
        print("llama-cpp-python not installed (make bench-peers): skipping llama.cpp")
        return []
    llm = Llama(model_path=str(gguf_path), n_ctx=1024, n_threads=torch.get_num_threads(), verbose=False)
    items = workloads[1]
    ttfts, tpots = [], []
    start = time.perf_counter()
    for item in items:  # llama-cpp-python serves one sequence at a time
        llm.reset()
        t0 = time.perf_counter()
        first = None
        n = 0
        for tok in llm.generate(item.prompt_ids, temp=0.0, top_k=1, reset=True):
            if first is None:
                first = time.perf_counter()
            n += 1
            if n == item.max_tokens:
                break
        end = time.perf_counter()
        ttfts.append(first - t0)
        tpots.append((end - first) / max(1, n - 1))
    row = _row("llama.cpp (Q4_1)", 1, items, time.perf_counter() - start, ttfts, tpots)
    print_table([row])
    return [row]


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="bench engine")
    ap.add_argument("--model", default=None)
    ap.add_argument("--dtype", default="float32", choices=["bfloat16", "float32"],
                    help="both systems run in this dtype (float32 is Weft's CPU default)")
    ap.add_argument("--suite-name", default="engine", help="results file name (bench/results/<name>.json)")
    ap.add_argument("--levels", default="1,8,32")
    ap.add_argument("--requests-per-level", type=int, default=0, help="default: max(4, 2*concurrency)")
    ap.add_argument("--skip-transformers", action="store_true")
    a = ap.parse_args(argv)
    levels = [int(x) for x in a.levels.split(",")]
    core = EngineCore(EngineConfig(model=a.model, dtype=a.dtype, kv_cache_gb=2.0))
    workloads = {c: make_workload(core.tokenizer, a.requests_per_level or max(4, 2 * c), seed=c) for c in levels}
    rows = bench_weft(core, workloads)
    if not a.skip_transformers:
        rows += bench_transformers(core.loaded.hf_dir, core.config.torch_dtype(), workloads)
    if core.loaded.source.suffix == ".gguf":
        rows += bench_llamacpp(core.loaded.source, workloads)
    by = {(r["system"], r["concurrency"]): r for r in rows}
    ratios = {}
    for c in levels:
        w, t = by.get(("weft", c)), by.get(("transformers", c))
        if w and t:
            ratios[f"c{c}_throughput_vs_transformers"] = w["tok_per_s"] / t["tok_per_s"]
    if ("weft", 1) in by and ("transformers", 1) in by:
        ratios["c1_decode_vs_transformers"] = by[("transformers", 1)]["tpot_ms"] / by[("weft", 1)]["tpot_ms"]
    l = next((r for r in rows if r["system"].startswith("llama.cpp")), None)
    if l and ("weft", 1) in by:
        ratios["c1_decode_vs_llamacpp"] = l["tpot_ms"] / by[("weft", 1)]["tpot_ms"]
    print()
    print_table(rows)
    print(ratios)
    workload = {"prompt_tokens": 100, "output_tokens": "16-256 spread", "greedy": True, "dtype": a.dtype,
                "levels": levels, "model": str(core.loaded.source)}
    cmd = "make bench BENCH=engine" + (f" ARGS='{' '.join(argv)}'" if argv else "")
    path = write_results(a.suite_name, workload, rows, ratios, cmd)
    print(f"wrote {path}")
    return 0
