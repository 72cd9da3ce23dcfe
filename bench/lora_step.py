"""python -m bench lora_step: one decode step of the native loop timed alone, base against a mix of
adapters (and the adapters' C ops by themselves), interleaved so that a shared machine's load
weighs on every variant alike. Where `bench lora`'s end-to-end ratio moves, this says whether
the step or the machine did. Prints only (no results file).

Usage: python -m bench lora_step [--model PATH] [--adapters 8] [--rank 16] [--tokens 32]
       [--context 200] [--reps 12] [--threads N]
"""
from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from bench.lora import make_adapters
from kernels import cpu_native
from kernels.attention import AttentionMetadata
from kernels.lora import make_plan
from service.config import EngineConfig
from service.engine.core import EngineCore
from service.models.lora import PROJECTIONS, LoRAStacks, LoRAStep


def _decode_meta(tokens: int, context: int, block_size: int, num_blocks: int) -> tuple[AttentionMetadata, torch.Tensor]:
    """A step of `tokens` single-token decodes at `context`, and each token's KV slot."""
    per = -(-context // block_size)
    tables = torch.arange(tokens * per, dtype=torch.long).view(tokens, per) % num_blocks
    meta = AttentionMetadata(query_start_loc=list(range(tokens + 1)), seq_lens=[context] * tokens,
                             block_tables=tables, seq_lens_t=torch.full((tokens,), context, dtype=torch.long),
                             num_decodes=tokens, block_size=block_size)
    last = context - 1
    return meta, tables[:, last // block_size] * block_size + last % block_size


def _lora_ops(stacks: LoRAStacks, token_slots: torch.Tensor) -> Callable[[], None]:
    """Every layer's four projections' adapter adds on random inputs, as the loop calls them."""
    t = token_slots.numel()
    ins = {p: torch.randn(t, stacks.shapes.parts(p)[0]) for p in PROJECTIONS}
    outs = {p: torch.zeros(t, sum(stacks.shapes.parts(p)[1])) for p in PROJECTIONS}

    def run() -> None:
        for layer in stacks.stacks:
            for p in PROJECTIONS:
                a, b = layer[p]
                cpu_native.lora_add(outs[p], ins[p], a, b, stacks.max_rank, stacks.part_cols[p], token_slots,
                                    stacks.num_slots)
    return run


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="bench lora_step")
    ap.add_argument("--model", default=None)
    ap.add_argument("--adapters", type=int, default=8)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--context", type=int, default=200)
    ap.add_argument("--reps", type=int, default=12)
    ap.add_argument("--threads", type=int, default=None)
    a = ap.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    core = EngineCore(EngineConfig(model=a.model, enable_lora=True, max_loras=a.adapters, max_lora_rank=a.rank,
                                   enable_prefix_caching=False, kv_cache_gb=2.0))
    with tempfile.TemporaryDirectory() as tmp:
        for path in make_adapters(core.loaded.hf_dir, Path(tmp), a.adapters, a.rank):
            core.add_adapter(*core.read_adapter(path.name, str(path)))
    model, stacks, caches = core.model, core.runner.lora_stacks, core.runner.kv_caches
    block_size = core.runner.block_size
    meta, slots = _decode_meta(a.tokens, a.context, block_size, caches[0][0].shape[0])
    positions = torch.full((a.tokens,), a.context - 1, dtype=torch.long)
    h = model.embed_tokens(torch.randint(0, 1000, (a.tokens,)))
    plan = make_plan([i % a.adapters for i in range(a.tokens)], stacks.num_slots, torch.device("cpu"))
    lora = LoRAStep(stacks, plan)
    variants: dict[str, Callable[[], object]] = {
        "base step": lambda: model.native(model, h.clone(), positions, caches, slots, meta),
        "mixed step": lambda: model.native(model, h.clone(), positions, caches, slots, meta, lora),
        "adapter ops alone": _lora_ops(stacks, plan.token_slots),
    }
    times: dict[str, list[float]] = {k: [] for k in variants}
    with torch.inference_mode():
        if variants["mixed step"]() is None:
            print("the native loop does not run here (no compiler, not float32 CPU, or WEFT_NATIVE=0)")
            return 1
        for _ in range(a.reps):
            for name, fn in variants.items():
                t0 = time.perf_counter()
                fn()
                times[name].append(1000 * (time.perf_counter() - t0))
    print(f"{a.tokens} decodes at context {a.context}, {a.adapters} adapters of rank {a.rank}, "
          f"{torch.get_num_threads()} threads, block size {block_size}")
    for name, ts in times.items():
        ts.sort()
        print(f"{name:18s} best {ts[0]:8.1f} ms  median {ts[len(ts) // 2]:8.1f} ms")
    return 0
