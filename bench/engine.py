"""make bench BENCH=engine: Weft against its peers at their best, one workload, one run.

Peers: transformers `generate` (static batches) in float32 and in bfloat16, each ratio taken
against the faster of the two; and, when llama-cpp-python is installed (make bench-peers),
llama.cpp on the same GGUF with continuous batching at every level, as llama-server runs it
(bench/llamacpp_batched.py). Levels 1, 8, 32 and 128 of ~100-token prompts and 16-256 new tokens;
a long-prompt workload (2,000-token prompts, 64 new tokens, one at a time) for prefill speed and
TTFT; and with llama.cpp two pairs at concurrency 1, Weft and llama.cpp decoding request by request
in A-B-B-A order: the GGUF itself (`c1_decode_vs_llamacpp` is read from this pair, both systems
under the same load; the level rows' c1 figures ran minutes apart) and the GGUF re-quantised to
Q4_K_M by llama.cpp's own quantiser. Weft runs in its default
dtype `auto` (the "weft" rows every ratio is of: bfloat16 where the CPU's bf16 GEMM measures
faster, i.e. bf16 GEMMs for steps of many rows, decoding float32's) and again in the other of
float32 and bfloat16 ("weft (float32)" or "weft (bfloat16)"), with ratios bf16 over float32. The
picture (bench/results/engine.png) is drawn from the results file.

Usage: python -m bench engine [--model PATH] [--dtype auto|bfloat16|float32] [--levels 1,8,32,128]
        [--requests-per-level K] [--long-prompt 2000] [--long-new 64] [--long-requests 4]
        [--skip-other-dtype] [--skip-transformers] [--skip-llamacpp] [--skip-q4km] [--skip-long]
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

from bench.common import print_table, throughput_row, write_results
from bench.llamacpp_batched import LlamaCppBatched, bench_llamacpp_batched
from bench.plot import throughput_plot
from bench.transformers_peer import bench_transformers
from bench.workload import Item, make_workload
from decoding.sampling import SamplingParams
from service.config import EngineConfig
from service.engine.async_engine import AsyncEngine
from service.engine.core import EngineCore


async def weft_level(engine: AsyncEngine, items: list[Item], conc: int, loras: list[str | None] | None = None,
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


def bench_weft(core: EngineCore, workloads: dict[int, list[Item]], name: str = "weft") -> list[dict]:
    async def run() -> list[dict]:
        engine = AsyncEngine(core)
        rows = []
        try:
            await weft_level(engine, next(iter(workloads.values()))[:1], 1)  # warm-up
            for conc, items in workloads.items():
                wall, ttfts, tpots = await weft_level(engine, items, conc)
                rows.append(throughput_row(name, conc, items, wall, ttfts, tpots))
                print_table(rows[-1:])
        finally:
            await engine.shutdown()
        return rows

    return asyncio.run(run())


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


def _llamacpp_one(runner: LlamaCppBatched, item: Item) -> tuple[float, float]:
    """One request through llama.cpp alone in its context: (TTFT, TPOT) in seconds."""
    _, ((ttft, tpot),) = runner.run([item], 1)
    return ttft, tpot


def _llamacpp(gguf_path: Path, items: list[Item]) -> LlamaCppBatched | None:
    """llama.cpp with one slot, set up as the batched peer is (use_extra_bufts off: ggml's AMX
    repacking crashed this process on a Xeon with AMX, as the issue warned for some VMs)."""
    if not _has_llamacpp():
        print("llama-cpp-python not installed (make bench-peers): skipping llama.cpp")
        return None
    ctx = max(len(i.prompt_ids) + i.max_tokens for i in items)
    return LlamaCppBatched(Path(gguf_path), 1, ctx, torch.get_num_threads())


def bench_pair_c1(core: EngineCore, gguf_path, items: list[Item], label: str) -> list[dict]:
    """Weft and llama.cpp on the same file at concurrency 1, request by request in A-B-B-A order
    (each warmed up first), so that both see the same load on a shared machine; tok_per_s is each
    system's tokens over its own requests' time. llama.cpp decodes on Weft's engine thread: its
    ggml runs on the process's libgomp, and from a second thread it would start a second OpenMP
    pool, which (service/engine/openmp.py) slowed both systems ~1.8x in this pairing."""
    llm = _llamacpp(gguf_path, items)
    if llm is None:
        return []

    async def run() -> list[dict]:
        engine = AsyncEngine(core)
        got = {"weft": ([], [], [0.0]), "llama.cpp": ([], [], [0.0])}
        try:
            await weft_level(engine, items[:1], 1)   # warm-up, both
            await engine.call(lambda _: _llamacpp_one(llm, items[0]))
            for k, item in enumerate(items):
                for who in (("weft", "llama.cpp") if k % 2 == 0 else ("llama.cpp", "weft")):
                    t0 = time.perf_counter()
                    if who == "weft":
                        _, (ttft,), (tpot,) = await weft_level(engine, [item], 1)
                    else:   # nothing of Weft's is in flight while llama.cpp runs
                        ttft, tpot = await engine.call(lambda _, item=item: _llamacpp_one(llm, item))
                    ttfts, tpots, wall = got[who]
                    ttfts.append(ttft)
                    tpots.append(tpot)
                    wall[0] += time.perf_counter() - t0
        finally:
            await engine.shutdown()
        return [throughput_row(f"{who} ({label})", 1, items, wall[0], ttfts, tpots) for who, (ttfts, tpots, wall) in got.items()]

    try:
        rows = asyncio.run(run())
    finally:
        llm.close()
    print_table(rows)
    return rows


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="bench engine")
    ap.add_argument("--model", default=None)
    ap.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float32"], help="Weft's dtype")
    ap.add_argument("--suite-name", default="engine", help="results file name (bench/results/<name>.json)")
    ap.add_argument("--levels", default="1,8,32,128")
    ap.add_argument("--requests-per-level", type=int, default=0,
                    help="K: max(K, concurrency) requests a level; default: max(4, 2*concurrency)")
    ap.add_argument("--long-prompt", type=int, default=2000, help="prompt tokens of the long-prompt workload")
    ap.add_argument("--long-new", type=int, default=64, help="new tokens of the long-prompt workload")
    ap.add_argument("--long-requests", type=int, default=4)
    ap.add_argument("--skip-other-dtype", action="store_true",
                    help="no 'weft (float32)' / 'weft (bfloat16)' rows (Weft again in the dtype it did not run)")
    ap.add_argument("--skip-transformers", action="store_true")
    ap.add_argument("--skip-llamacpp", action="store_true")
    ap.add_argument("--skip-long", action="store_true", help="no long-prompt workload")
    ap.add_argument("--skip-q4km", action="store_true", help="no Q4_K_M row (Weft and llama.cpp on a Q4_K_M re-quantisation)")
    a = ap.parse_args(argv)
    levels = [int(x) for x in a.levels.split(",")]
    load_start = os.getloadavg()   # other jobs on the machine: the figures are only as good as it is idle
    threads = torch.get_num_threads()
    core = EngineCore(EngineConfig(model=a.model, dtype=a.dtype, kv_cache_gb=4.0))
    workloads = {c: make_workload(core.tokenizer, max(a.requests_per_level, c) if a.requests_per_level else max(4, 2 * c),
                                  seed=c) for c in levels}
    # The long-prompt workload runs one request at a time: its TTFT is one prefill's time.
    long = {} if a.skip_long else {1: make_workload(core.tokenizer, a.long_requests, prompt_len=a.long_prompt,
                                                   seed=2000, min_out=a.long_new, max_out=a.long_new)}
    rows = bench_weft(core, workloads) + (_long_rows(bench_weft(core, long), a.long_prompt) if long else [])
    source = core.loaded.source
    chosen = core.config.dtype   # what auto resolved to
    other = "bfloat16" if chosen == "float32" else "float32"
    if chosen in ("float32", "bfloat16") and not a.skip_other_dtype:
        # The same engine in the other dtype (bfloat16: bf16 GEMMs for steps of many rows).
        second = EngineCore(EngineConfig(model=a.model, dtype=other, kv_cache_gb=4.0))
        name = f"weft ({other})"
        rows += bench_weft(second, workloads, name) + (_long_rows(bench_weft(second, long, name), a.long_prompt)
                                                       if long else [])
        del second
    workload = {"prompt_tokens": 100, "output_tokens": "16-256 spread", "greedy": True,
                "dtype": a.dtype if a.dtype == chosen else f"{a.dtype}: {chosen}",
                "levels": levels, "model": str(source),
                "long_prompt": None if a.skip_long else {"prompt_tokens": a.long_prompt, "new_tokens": a.long_new,
                                                         "requests": a.long_requests, "concurrency": 1}}
    if not a.skip_transformers:
        for dtype in (torch.float32, torch.bfloat16):
            name = f"transformers ({str(dtype).removeprefix('torch.')})"
            rows += bench_transformers(core.loaded.hf_dir, dtype, workloads, name)
            rows += _long_rows(bench_transformers(core.loaded.hf_dir, dtype, long, name) if long else [], a.long_prompt)
    label = source.stem.rsplit(".", 1)[-1]
    if source.suffix == ".gguf" and not a.skip_llamacpp and _has_llamacpp():
        got, workload["llamacpp"] = bench_llamacpp_batched(source, workloads, label, threads)
        rows += got
        if 1 in workloads:
            # c1 decode, the ratio the issue names, again side by side: the level rows above ran
            # minutes apart, and a shared machine's speed moves 10-20% in that time.
            rows += bench_pair_c1(core, source, workloads[1], f"{label}, paired")
            workload["c1_pair_order"] = "Weft and llama.cpp request by request, A-B-B-A, both warmed up"
        if long:
            rows += _long_rows(bench_llamacpp_batched(source, long, label, threads)[0], a.long_prompt)
        q4km = q4km_path(source) if "Q4_K_M" not in source.name and not a.skip_q4km else None
        if q4km is not None:
            # The c1 workload of the rows above (the same prompts: the file keeps the tokenizer).
            c1 = workloads.get(1) or make_workload(core.tokenizer, a.requests_per_level or 4, seed=1)
            workload["q4km_order"] = "Weft and llama.cpp request by request, A-B-B-A, both warmed up"
            del core
            core = EngineCore(EngineConfig(model=str(q4km), dtype=a.dtype, kv_cache_gb=2.0))
            rows += bench_pair_c1(core, q4km, c1, "Q4_K_M")
            workload["q4km_model"] = str(q4km)
            workload["q4km_made_by"] = ("llama.cpp's llama_model_quantize (llama-cpp-python, LLAMA_FTYPE_MOSTLY_Q4_K_M, "
                                        f"allow_requantize) from {source.name}: a requantised Q4_K_M, not one from float weights")
            workload["q4km_tensor_types"] = _tensor_types(q4km)
    ratios = _ratios(rows, levels, label, chosen)
    print()
    print_table(rows)
    print(ratios)
    workload["load_average"] = {"start": [round(x, 2) for x in load_start], "end": [round(x, 2) for x in os.getloadavg()],
                                "what": "1, 5, 15 min load averages of the machine (its cores are shared)"}
    path = write_results(a.suite_name, workload, rows, ratios, _command(argv))
    print(f"wrote {path}")
    try:
        print(f"wrote {throughput_plot(path)}")
    except ImportError:
        print("matplotlib not installed (make bench-peers): no picture")
    return 0


def _long_rows(rows: list[dict], prompt_tokens: int) -> list[dict]:
    """Rows of the long-prompt workload: marked as such, with prefill speed from the median TTFT."""
    return [{**r, "workload": "long prompts", "prefill_tok_per_s": prompt_tokens / (r["ttft_p50_ms"] / 1000)}
            for r in rows]


def _ratios(rows: list[dict], levels: list[int], label: str, chosen: str) -> dict[str, float]:
    """Weft (in `chosen`, its dtype) over each peer; transformers' figure is the faster of its two
    dtypes, level by level."""
    level_rows = [r for r in rows if "workload" not in r]
    long_rows = [r for r in rows if r.get("workload") == "long prompts"]
    llama = f"llama.cpp ({label})"

    def find(rows: list[dict], system: str, c: int = 1) -> dict | None:
        return next((r for r in rows if r["system"] == system and r["concurrency"] == c), None)

    def best_transformers(rows: list[dict], c: int, field: str, higher: bool) -> dict | None:
        found = [r for r in rows if r["system"].startswith("transformers") and r["concurrency"] == c]
        return (max if higher else min)(found, key=lambda r: r[field]) if found else None

    ratios: dict[str, float] = {}
    for c in levels:
        w, t, l = find(level_rows, "weft", c), best_transformers(level_rows, c, "tok_per_s", True), find(level_rows, llama, c)
        if w and t:
            ratios[f"c{c}_throughput_vs_best_transformers"] = w["tok_per_s"] / t["tok_per_s"]
        if w and l:
            ratios[f"c{c}_throughput_vs_llamacpp_batched"] = w["tok_per_s"] / l["tok_per_s"]
    w, t, l = find(level_rows, "weft"), best_transformers(level_rows, 1, "tpot_ms", False), find(level_rows, llama)
    if w and t:
        ratios["c1_decode_vs_best_transformers"] = t["tpot_ms"] / w["tpot_ms"]
    wp, lp = find(level_rows, f"weft ({label}, paired)"), find(level_rows, f"llama.cpp ({label}, paired)")
    if wp and lp:   # side by side, request by request: the figure the target is read from
        ratios["c1_decode_vs_llamacpp"] = lp["tpot_ms"] / wp["tpot_ms"]
        if w and l:
            ratios["c1_decode_vs_llamacpp_level_rows"] = l["tpot_ms"] / w["tpot_ms"]
    elif w and l:
        ratios["c1_decode_vs_llamacpp"] = l["tpot_ms"] / w["tpot_ms"]
    w, t, l = find(long_rows, "weft"), best_transformers(long_rows, 1, "prefill_tok_per_s", True), find(long_rows, llama)
    if w and t:
        ratios["prefill_tok_per_s_vs_best_transformers"] = w["prefill_tok_per_s"] / t["prefill_tok_per_s"]
    if w and l:
        ratios["prefill_tok_per_s_vs_llamacpp"] = w["prefill_tok_per_s"] / l["prefill_tok_per_s"]
    f32, bf16 = ("weft", "weft (bfloat16)") if chosen == "float32" else ("weft (float32)", "weft")
    for c in levels:
        w, b = find(level_rows, f32, c), find(level_rows, bf16, c)
        if w and b:
            ratios[f"c{c}_throughput_bf16_vs_float32"] = b["tok_per_s"] / w["tok_per_s"]
    w, b = find(long_rows, f32), find(long_rows, bf16)
    if w and b:
        ratios["prefill_tok_per_s_bf16_vs_float32"] = b["prefill_tok_per_s"] / w["prefill_tok_per_s"]
    wq, lq = find(level_rows, "weft (Q4_K_M)"), find(level_rows, "llama.cpp (Q4_K_M)")
    if wq and lq:
        ratios["c1_decode_q4km_vs_llamacpp"] = lq["tpot_ms"] / wq["tpot_ms"]
    return ratios


def _has_llamacpp() -> bool:
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        print("llama-cpp-python not installed (make bench-peers): no llama.cpp rows")
        return False
    return True


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
