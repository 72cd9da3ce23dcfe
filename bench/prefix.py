"""make bench BENCH=prefix: what prefix caching buys, measured in one run.

1. Chat workload with a ~1,000-token shared system prompt: TTFT of later requests vs the first
   (caching on). Ratio ttft_repeat_vs_first (target <= 0.2).
2. A workload without shared prefixes, caching on vs off: throughput ratio
   throughput_on_vs_off_noshare (target >= 0.97): hashing and LRU bookkeeping must cost ~nothing.

Usage: python -m bench prefix [--model PATH] [--dtype float32|bfloat16] [--repeats N]
"""
from __future__ import annotations

import argparse
import asyncio
import time

from bench.common import median, print_table, write_results
from bench.workload import TEXT, make_workload
from decoding.sampling import SamplingParams
from service.config import EngineConfig
from service.engine.async_engine import AsyncEngine
from service.engine.core import EngineCore
from service.loader import load_model

QUESTIONS = [
    "What is the weft?", "Who built the first Jacquard loom?", "Why do looms matter for computing?",
    "Summarise the text in five words.", "What is a shuttle?", "Name one modern use of weaving.",
    "Is the warp vertical?", "What did punched cards store?",
]


async def _ttft(engine: AsyncEngine, prompt: list[int], max_tokens: int) -> float:
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    t0 = time.perf_counter()
    first = None
    async for out in engine.generate(prompt, params):
        if first is None and out.token_ids:
            first = time.perf_counter()
    return first - t0


async def _throughput(engine: AsyncEngine, items, conc: int) -> float:
    sem = asyncio.Semaphore(conc)

    async def one(item) -> int:
        async with sem:
            params = SamplingParams(temperature=0, max_tokens=item.max_tokens, ignore_eos=True)
            return sum([len(o.token_ids) async for o in engine.generate(item.prompt_ids, params)])

    t0 = time.perf_counter()
    tokens = sum(await asyncio.gather(*(one(i) for i in items)))
    return tokens / (time.perf_counter() - t0)


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="bench prefix")
    ap.add_argument("--model", default=None)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--repeats", type=int, default=8)
    ap.add_argument("--noshare-requests", type=int, default=16)
    a = ap.parse_args(argv)

    loaded = load_model(a.model, dtype=a.dtype)
    tok = loaded.tokenizer
    system = (TEXT + " ") * 10
    sys_ids = tok.encode(system, add_special_tokens=False)[:1000]
    system = tok.decode(sys_ids)

    def chat(q: str) -> list[int]:
        text = tok.apply_chat_template([{"role": "system", "content": system}, {"role": "user", "content": q}])
        return tok.encode(text, add_special_tokens=False)

    async def run() -> tuple[list[dict], dict]:
        rows: list[dict] = []
        ratios: dict[str, float] = {}
        cfg = dict(model=a.model, dtype=a.dtype, kv_cache_gb=1.0, progress=False)
        # Part 1: shared system prompt, one request at a time (TTFT is then pure prefill time).
        engine = AsyncEngine(EngineCore(EngineConfig(**cfg), loaded=load_model(a.model, dtype=a.dtype, progress=False)))
        try:
            await _ttft(engine, tok.encode("warm up", add_special_tokens=False), 2)
            prompts = [chat(QUESTIONS[i % len(QUESTIONS)]) for i in range(a.repeats + 1)]
            first = await _ttft(engine, prompts[0], 8)
            later = [await _ttft(engine, p, 8) for p in prompts[1:]]
            rows.append({"case": "shared ~1000-token system prompt", "prompt_tokens": len(prompts[0]),
                         "first_ttft_ms": 1000 * first, "later_ttft_ms_median": 1000 * median(later),
                         "hit_rate": engine.stats().prefix_hit_rate})
            ratios["ttft_repeat_vs_first"] = median(later) / first
        finally:
            await engine.shutdown()
        # Part 2: no shared prefixes, caching on vs off (interleaved twice to even out drift).
        items = make_workload(tok, a.noshare_requests, seed=11, min_out=16, max_out=64)
        tputs: dict[bool, list[float]] = {True: [], False: []}
        for on in (True, False, True, False):
            core = EngineCore(EngineConfig(**cfg, enable_prefix_caching=on),
                              loaded=load_model(a.model, dtype=a.dtype, progress=False))
            engine = AsyncEngine(core)
            try:
                # Distinct prompts: prefix each with a unique token so no two requests share a block.
                uniq = [type(i)([1000 + k] + i.prompt_ids, i.max_tokens) for k, i in enumerate(items)]
                tputs[on].append(await _throughput(engine, uniq, 8))
            finally:
                await engine.shutdown()
        for on in (True, False):
            rows.append({"case": f"no shared prefix, caching {'on' if on else 'off'}", "tok_per_s": median(tputs[on])})
        ratios["throughput_on_vs_off_noshare"] = median(tputs[True]) / median(tputs[False])
        return rows, ratios

    rows, ratios = asyncio.run(run())
    print_table(rows)
    print(ratios)
    workload = {"system_prompt_tokens": 1000, "repeats": a.repeats, "noshare_requests": a.noshare_requests,
                "noshare_concurrency": 8, "dtype": a.dtype}
    print("wrote", write_results("prefix", workload, rows, ratios, "make bench BENCH=prefix"))
    return 0
