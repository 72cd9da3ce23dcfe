"""Decode ms/token of the default model on CPU, dtype float32 against bfloat16 (bf16 weights,
float32 activations: service/models/bf16_packed.py) and the old bf16 path (the torch loop in
bf16), at batch 1 and 8; arms interleaved in one process, medians of `--reps` runs. The default
model's float32 weights are a GGUF's de-quantised Q4_1 / Q8_0 blocks, which float32 streams
(0.75-1.1 bytes a weight, service/models/gguf_packed.py); the arm "float32, no GGUF blocks" runs
it with WEFT_PACKED=0, as a float32 checkpoint of plain safetensors runs (sgemm throughout).
bfloat16 runs twice: as the default model is built (from its GGUF: decodes stream the GGUF's
blocks, as float32 does) and as a safetensors checkpoint would be (its weights' FMT_BF16 bits).

Usage: python -m bench bf16_decode [--reps 5] [--tokens 32] [--threads N]   (prints only, no results file)

A step's cost is (time of `tokens + 1` output tokens - time of 1) / tokens: prefill cancels.
"""
from __future__ import annotations

import argparse
import os
from contextlib import nullcontext
import statistics
import time
from unittest import mock

import torch

from decoding.sampling import SamplingParams
from service.llm import LLM
from service.loader import resolve_hf_dir
from service.models import bf16_packed

PROMPTS = ["What is the capital of France?", "Write a haiku about the sea.", "List three uses of copper.",
           "Explain in one sentence why the sky is blue.", "Name three rivers in Europe.",
           "What does a compiler do?", "Give me a synonym for happy.", "How many legs does a spider have?"]


def _llm(path: str, dtype: str, old_bf16: bool, no_gguf: bool = False) -> LLM:
    """An engine for one arm; the old bf16 path is what build_model did before bf16_packed;
    `no_gguf` builds as from safetensors (bf16: the weights' FMT_BF16 bits, not the GGUF's blocks)."""
    with mock.patch.object(bf16_packed, "applies", lambda *a: False) if old_bf16 else nullcontext(), \
            mock.patch("service.models.build.gguf_source", lambda loaded: None) if no_gguf else nullcontext():
        return LLM(path, dtype=dtype, progress=False, kv_cache_gb=0.5, enable_prefix_caching=False)


def _seconds(llm: LLM, prompts: list[list[int]], tokens: int, env: dict[str, str]) -> float:
    params = SamplingParams(temperature=0, max_tokens=tokens, ignore_eos=True)
    with mock.patch.dict(os.environ, env):
        start = time.perf_counter()
        llm.generate(prompts, params)
        return time.perf_counter() - start


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench bf16_decode")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    path = str(resolve_hf_dir(None))
    f32 = _llm(path, "float32", False)
    arms = {"float32 (GGUF Q4_1 blocks)": (f32, {}), "float32, no GGUF blocks": (f32, {"WEFT_PACKED": "0"}),
            "bfloat16 (GGUF blocks)": (_llm(path, "bfloat16", False), {}),
            "bfloat16 (FMT_BF16 bits)": (_llm(path, "bfloat16", False, no_gguf=True), {}),
            "bfloat16 (old: torch loop in bf16)": (_llm(path, "bfloat16", True), {})}
    tok = f32.tokenizer
    ids = [tok.encode(tok.apply_chat_template([{"role": "user", "content": p}]), add_special_tokens=False)
           for p in PROMPTS]
    times: dict[tuple[str, int], list[float]] = {}
    for _ in range(args.reps):
        for batch in (1, 8):
            for name, (llm, env) in arms.items():
                t = _seconds(llm, ids[:batch], args.tokens + 1, env) - _seconds(llm, ids[:batch], 1, env)
                times.setdefault((name, batch), []).append(1000 * t / args.tokens)
    print(f"{torch.get_num_threads()} threads, {args.reps} runs of {args.tokens} decode steps")
    for (name, batch), ms in times.items():
        print(f"batch {batch}  {name:36s} median {statistics.median(ms):7.2f}  min {min(ms):7.2f} ms/step  "
              f"runs {' '.join(f'{v:.1f}' for v in ms)}")
    return 0
