"""make bench BENCH=engine: Weft vs transformers generate (static batches, same dtype) and, when
llama-cpp-python is installed, llama.cpp on the same GGUF — one workload, one run. With llama.cpp
there is also a Q4_K_M row at concurrency 1: the GGUF re-quantised to Q4_K_M by llama.cpp's own
quantiser, Weft and llama.cpp decoding that file.

Usage: python -m bench engine [--model PATH] [--dtype bfloat16|float32] [--levels 1,8,32] [--requests-per-level K]
                              [--skip-transformers] [--skip-q4km]
"""
from __future__ import annotations

import argparse
import asyncio
import ctypes
import os
import sys
import time
from collections import Counter
from pathlib import Path

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


def bench_weft(core: EngineCore, workloads: dict[int, list[Item]], system: str = "weft") -> list[dict]:
    async def run() -> list[dict]:
        engine = AsyncEngine(core)
        rows = []
        try:
            await _weft_level(engine, workloads[1][:1], 1)  # warm-up
            for conc, items in workloads.items():
                wall, ttfts, tpots = await _weft_level(engine, items, conc)
                rows.append(_row(system, conc, items, wall, ttfts, tpots))
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


def q4km_path(src: Path) -> Path | None:
    """`src` re-quantised to Q4_K_M by llama.cpp's own quantiser (`llama_model_quantize`, with
    allow_requantize: the default model is already Q4_1, so this is a requantised Q4_K_M), cached
    under <cache>/bench; None when llama-cpp-python is not installed."""
    try:
        import llama_cpp
    except ImportError:
        return None
    from common import env

    dst = env.cache_dir() / "bench" / f"{src.stem.rsplit('.', 1)[0]}.Q4_K_M-from-{src.stem.rsplit('.', 1)[-1]}.gguf"
    if dst.is_file():
        return dst
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f"{dst.name}.{os.getpid()}.tmp")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M
    params.allow_requantize = True
    params.nthread = torch.get_num_threads()
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(tmp).encode(), ctypes.byref(params))
    if rc != 0:
        tmp.unlink(missing_ok=True)
        raise RuntimeError(f"llama_model_quantize({src} -> Q4_K_M) failed: {rc}")
    os.replace(tmp, dst)  # written, then renamed: a half-written file is never taken for the cache
    return dst


def _llamacpp_one(llm, item: Item) -> tuple[float, float]:
    """One request through llama-cpp-python (one sequence at a time): (TTFT, TPOT) in seconds."""
    llm.reset()
    t0 = time.perf_counter()
    first = None
    n = 0
    for _ in llm.generate(item.prompt_ids, temp=0.0, top_k=1, reset=True):
        if first is None:
            first = time.perf_counter()
        n += 1
        if n == item.max_tokens:
            break
    end = time.perf_counter()
    return first - t0, (end - first) / max(1, n - 1)


def _llamacpp(gguf_path):
    try:
        from llama_cpp import Llama
    except ImportError:
        print("llama-cpp-python not installed (make bench-peers): skipping llama.cpp")
        return None
    return Llama(model_path=str(gguf_path), n_ctx=1024, n_threads=torch.get_num_threads(), verbose=False)


def bench_llamacpp(gguf_path, workloads: dict[int, list[Item]], label: str = "Q4_1") -> list[dict]:
    llm = _llamacpp(gguf_path)
    if llm is None:
        return []
    items = workloads[1]
    start = time.perf_counter()
    ttfts, tpots = zip(*(_llamacpp_one(llm, item) for item in items))
    row = _row(f"llama.cpp ({label})", 1, items, time.perf_counter() - start, list(ttfts), list(tpots))
    print_table([row])
    return [row]


def bench_pair_c1(core: EngineCore, gguf_path, items: list[Item], label: str) -> list[dict]:
    """Weft and llama.cpp on the same file at concurrency 1, request by request in A-B-B-A order
    (each warmed up first), so that both see the same load on a shared machine; tok_per_s is each
    system's tokens over its own requests' time."""
    llm = _llamacpp(gguf_path)
    if llm is None:
        return []

    async def run() -> list[dict]:
        engine = AsyncEngine(core)
        got = {"weft": ([], [], [0.0]), "llama.cpp": ([], [], [0.0])}
        try:
            await _weft_level(engine, items[:1], 1)   # warm-up, both
            _llamacpp_one(llm, items[0])
            for k, item in enumerate(items):
                for who in (("weft", "llama.cpp") if k % 2 == 0 else ("llama.cpp", "weft")):
                    t0 = time.perf_counter()
                    if who == "weft":
                        _, (ttft,), (tpot,) = await _weft_level(engine, [item], 1)
                    else:   # nothing of Weft's is in flight while llama.cpp runs
                        ttft, tpot = _llamacpp_one(llm, item)
                    ttfts, tpots, wall = got[who]
                    ttfts.append(ttft)
                    tpots.append(tpot)
                    wall[0] += time.perf_counter() - t0
        finally:
            await engine.shutdown()
        return [_row(f"{who} ({label})", 1, items, wall[0], ttfts, tpots) for who, (ttfts, tpots, wall) in got.items()]

    rows = asyncio.run(run())
    print_table(rows)
    return rows


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="bench engine")
    ap.add_argument("--model", default=None)
    ap.add_argument("--dtype", default="float32", choices=["bfloat16", "float32"],
                    help="both systems run in this dtype (float32 is Weft's CPU default)")
    ap.add_argument("--suite-name", default="engine", help="results file name (bench/results/<name>.json)")
    ap.add_argument("--levels", default="1,8,32")
    ap.add_argument("--requests-per-level", type=int, default=0, help="default: max(4, 2*concurrency)")
    ap.add_argument("--skip-transformers", action="store_true")
    ap.add_argument("--skip-q4km", action="store_true", help="no Q4_K_M row (Weft and llama.cpp on a Q4_K_M re-quantisation)")
    a = ap.parse_args(argv)
    levels = [int(x) for x in a.levels.split(",")]
    load_start = os.getloadavg()   # other jobs on the machine: the figures are only as good as it is idle
    core = EngineCore(EngineConfig(model=a.model, dtype=a.dtype, kv_cache_gb=2.0))
    workloads = {c: make_workload(core.tokenizer, a.requests_per_level or max(4, 2 * c), seed=c) for c in levels}
    rows = bench_weft(core, workloads)
    if not a.skip_transformers:
        rows += bench_transformers(core.loaded.hf_dir, core.config.torch_dtype(), workloads)
    source = core.loaded.source
    workload = {"prompt_tokens": 100, "output_tokens": "16-256 spread", "greedy": True, "dtype": a.dtype,
                "levels": levels, "model": str(source)}
    if source.suffix == ".gguf":
        rows += bench_llamacpp(source, workloads, source.stem.rsplit(".", 1)[-1])
    q4km = (q4km_path(source) if source.suffix == ".gguf" and "Q4_K_M" not in source.name and not a.skip_q4km
            else None)
    if q4km is not None:
        # The c1 workload of the rows above (the same prompts: the file keeps the tokenizer).
        c1 = {1: workloads.get(1) or make_workload(core.tokenizer, a.requests_per_level or 4, seed=1)}
        workload["q4km_order"] = "Weft and llama.cpp request by request, A-B-B-A, both warmed up"
        del core
        core = EngineCore(EngineConfig(model=str(q4km), dtype=a.dtype, kv_cache_gb=2.0))
        rows += bench_pair_c1(core, q4km, c1[1], "Q4_K_M")
        workload["q4km_model"] = str(q4km)
        workload["q4km_made_by"] = ("llama.cpp's llama_model_quantize (llama-cpp-python, LLAMA_FTYPE_MOSTLY_Q4_K_M, "
                                    f"allow_requantize) from {source.name}: a requantised Q4_K_M, not one from float weights")
        workload["q4km_tensor_types"] = _tensor_types(q4km)
    by = {(r["system"], r["concurrency"]): r for r in rows}
    ratios = {}
    for c in levels:
        w, t = by.get(("weft", c)), by.get(("transformers", c))
        if w and t:
            ratios[f"c{c}_throughput_vs_transformers"] = w["tok_per_s"] / t["tok_per_s"]
    if ("weft", 1) in by and ("transformers", 1) in by:
        ratios["c1_decode_vs_transformers"] = by[("transformers", 1)]["tpot_ms"] / by[("weft", 1)]["tpot_ms"]
    l = next((r for r in rows if r["system"].startswith("llama.cpp") and "Q4_K_M" not in r["system"]), None)
    if l and ("weft", 1) in by:
        ratios["c1_decode_vs_llamacpp"] = l["tpot_ms"] / by[("weft", 1)]["tpot_ms"]
    wq, lq = by.get(("weft (Q4_K_M)", 1)), by.get(("llama.cpp (Q4_K_M)", 1))
    if wq and lq:
        ratios["c1_decode_q4km_vs_llamacpp"] = lq["tpot_ms"] / wq["tpot_ms"]
    print()
    print_table(rows)
    print(ratios)
    workload["load_average"] = {"start": [round(x, 2) for x in load_start], "end": [round(x, 2) for x in os.getloadavg()],
                                "what": "1, 5, 15 min load averages of the machine (its cores are shared)"}
    path = write_results(a.suite_name, workload, rows, ratios, _command(argv))
    print(f"wrote {path}")
    return 0


def _tensor_types(gguf: Path) -> dict[str, int]:
    """How many of the GGUF's matrices are of each quant type."""
    from gguf import GGUFReader

    return dict(Counter(t.tensor_type.name for t in GGUFReader(str(gguf)).tensors if len(t.shape) > 1).most_common())


def _command(argv: list[str]) -> str:
    """The command as run: `make bench ...` from the repository's own venv, else the interpreter."""
    args = " ".join(argv)
    if Path(sys.prefix).resolve() == (Path(__file__).resolve().parents[1] / ".venv").resolve():
        return "make bench BENCH=engine" + (f" ARGS='{args}'" if args else "")
    return f"{sys.executable} -m bench engine {args}".rstrip()
