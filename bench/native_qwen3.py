"""python -m bench native_qwen3: ms per decode step of a random Qwen3 (default hidden 512, 8 layers)
with the torch ops only (WEFT_NATIVE=0), the layer loop over native ops (WEFT_NATIVE=1 without
the one-C-call loop) and the one-C-call loop (WEFT_NATIVE=1), at each batch size. The variants are
interleaved per repetition so that a shared machine's load weighs on each alike; medians printed.
A decode step's time is (generate of 1 + D tokens - generate of 1 token) / D: the prefill cancels.
Prints only (no results file).

Usage: python -m bench native_qwen3 [--hidden 512] [--layers 8] [--batches 1 8] [--decode 32] [--reps 5]
"""
from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from bench.common import median
from decoding.sampling import SamplingParams
from service.llm import LLM
from service.loader import default_model_path, resolve_hf_dir

PROMPT_LEN = 32


def _write_qwen3(out: Path, hidden: int, layers: int) -> Path:
    """A random Qwen3 of the given width and depth (head_dim 64, 2 queries per KV head, FFN 3 x hidden,
    an 8192-token vocabulary so that the lm_head does not dominate), with SmolLM2's tokenizer files."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    heads = hidden // 64
    config = Qwen3Config(vocab_size=8192, hidden_size=hidden, intermediate_size=3 * hidden, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=max(1, heads // 2), head_dim=64,
                         max_position_embeddings=1024, tie_word_embeddings=True)
    torch.manual_seed(0)
    Qwen3ForCausalLM(config).save_pretrained(out)
    tokenizer_dir = resolve_hf_dir(default_model_path(), progress=False)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (tokenizer_dir / name).is_file():
            shutil.copy2(tokenizer_dir / name, out / name)
    return out


def _decode_ms(llm: LLM, batch: int, decode: int) -> float:
    prompts = [[100 + 7 * i + j for j in range(PROMPT_LEN)] for i in range(batch)]

    def timed(tokens: int) -> float:
        started = time.perf_counter()
        llm.generate(prompts, SamplingParams(temperature=0, max_tokens=tokens, ignore_eos=True))
        return time.perf_counter() - started

    return (timed(1 + decode) - timed(1)) / decode * 1000


def _variants(llm: LLM) -> dict[str, Callable[[], None]]:
    """Name -> set-up of that variant (each undoes the others')."""
    model, native = llm.engine.model, llm.engine.model.native

    def use(env: str, loop: object) -> Callable[[], None]:
        def setup() -> None:
            os.environ["WEFT_NATIVE"] = env
            model.native = loop
        return setup

    return {"torch ops (WEFT_NATIVE=0)": use("0", None), "layer loop, native ops": use("1", None),
            "one-C-call loop (WEFT_NATIVE=1)": use("1", native)}


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench native_qwen3")
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--decode", type=int, default=32)
    ap.add_argument("--reps", type=int, default=5)
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        llm = LLM(str(_write_qwen3(Path(tmp), args.hidden, args.layers)), dtype="float32", progress=False,
                  num_blocks=64)
        variants = _variants(llm)
        native = llm.engine.model.native
        times: dict[tuple[str, int], list[float]] = {}
        for name, setup in variants.items():   # warm-up: the native build, first-call allocations
            setup()
            _decode_ms(llm, max(args.batches), 2)
        for _ in range(args.reps):
            for batch in args.batches:
                for name, setup in variants.items():
                    setup()
                    times.setdefault((name, batch), []).append(_decode_ms(llm, batch, args.decode))
        variants["one-C-call loop (WEFT_NATIVE=1)"]()
    print(f"Qwen3 hidden {args.hidden}, {args.layers} layers, {torch.get_num_threads()} threads; "
          f"ms per decode step (batch tokens each), median of {args.reps} (min-max); "
          f"{native.steps} steps ran in the C loop")
    for batch in args.batches:
        for name in variants:
            values = times[(name, batch)]
            print(f"  batch {batch:3d}  {name:34s} {median(values):7.2f}  ({min(values):.2f}-{max(values):.2f})")
    return 0
