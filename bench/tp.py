"""bench tp: what tensor parallelism costs or gains on this machine — one rank against two (gloo,
local processes, the cores split between them) at concurrency 1 and 32, with the communication
each step needs (collectives, bytes, seconds on rank 0).

The model is a random-weight Llama of SmolLM2-135M's size with 8 heads and 2 KV heads (SmolLM2's
own 9 heads do not split in two), written once under $WEFT_CACHE_DIR/bench. One rank runs with
the native C decoder loop (as Weft serves by default) and with the torch loop the ranks use
(WEFT_NATIVE=0), so that the cost of the loop and of the communication can be told apart."""
from __future__ import annotations

import argparse
import os
import random
import shutil
import time
from pathlib import Path

import torch

from bench.common import print_table, write_results
from common import env
from decoding.sampling import SamplingParams
from service.llm import LLM

SHAPE = {"vocab_size": 49152, "hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30,
         "num_attention_heads": 8, "num_key_value_heads": 2, "max_position_embeddings": 2048,
         "tie_word_embeddings": True, "rms_norm_eps": 1e-5, "bos_token_id": 1, "eos_token_id": 2}


def bench_model() -> Path:
    """The random Llama above, written once (write, then rename: never half a model)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from service.loader import default_model_path, resolve_hf_dir

    out = env.cache_dir() / "bench" / "tp-llama-8h-2kv"
    if (out / "config.json").is_file():
        return out
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(**SHAPE, initializer_range=0.05)).save_pretrained(tmp)
    tokenizer = resolve_hf_dir(default_model_path())
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (tokenizer / name).is_file():
            shutil.copy2(tokenizer / name, tmp / name)
    os.replace(tmp, out)
    return out


def run(llm: LLM, prompts: list[list[int]], new_tokens: int) -> dict:
    """Every prompt at once, stepped to the end; tokens/s and per-step figures."""
    core = llm.engine
    params = SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True)
    tp = core.tp
    before = (tp.stats.calls, tp.stats.bytes, tp.stats.seconds) if tp else (0, 0, 0.0)
    for i, p in enumerate(prompts):
        core.add_request(f"r{i}-{time.monotonic_ns()}", p, params)
    steps = 0
    t0 = time.perf_counter()
    while core.has_unfinished():
        core.step()
        steps += 1
    seconds = time.perf_counter() - t0
    row = {"tok_per_s": round(len(prompts) * new_tokens / seconds, 1), "ms_per_step": round(1000 * seconds / steps, 2)}
    if tp:
        calls, nbytes, comm = (a - b for a, b in zip((tp.stats.calls, tp.stats.bytes, tp.stats.seconds), before))
        row |= {"collectives_per_step": round(calls / steps, 1), "kib_per_step": round(nbytes / steps / 1024, 1),
                "comm_ms_per_step": round(1000 * comm / steps, 2), "comm_share": round(comm / seconds, 3)}
    return row


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="bench tp")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--prompt-tokens", type=int, default=100)
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 32])
    a = ap.parse_args(argv)
    path = bench_model()
    load_before = os.getloadavg()[0]
    rng = random.Random(0)
    rows: list[dict] = []
    setups = [("1 rank (native loop)", 1, "1"), ("1 rank (torch loop)", 1, "0"), ("2 ranks", 2, "1")]
    for name, world, native in setups:
        os.environ["WEFT_NATIVE"] = native
        llm = LLM(str(path), dtype="float32", progress=False, num_blocks=1024, tensor_parallel_size=world)
        try:
            run(llm, [[rng.randrange(1000, 40000) for _ in range(a.prompt_tokens)]], 8)     # warm-up
            for c in a.concurrency:
                prompts = [[rng.randrange(1000, 40000) for _ in range(a.prompt_tokens)] for _ in range(c)]
                rows.append({"setup": name, "concurrency": c, **run(llm, prompts, a.new_tokens)})
                print_table(rows[-1:])
        finally:
            llm.close()   # gives the driver of two ranks its whole thread count back
    os.environ.pop("WEFT_NATIVE", None)
    print_table(rows)

    def tps(setup: str, c: int) -> float:
        return next(r["tok_per_s"] for r in rows if r["setup"] == setup and r["concurrency"] == c)

    ratios = {}
    for c in a.concurrency:
        ratios[f"c{c}_tp2_vs_tp1"] = tps("2 ranks", c) / tps("1 rank (native loop)", c)
        ratios[f"c{c}_tp2_vs_tp1_torch_loop"] = tps("2 ranks", c) / tps("1 rank (torch loop)", c)
    workload = {"model": "random Llama, SmolLM2-135M's size, 8 heads / 2 KV heads, 30 layers, float32",
                "prompt_tokens": a.prompt_tokens, "new_tokens": a.new_tokens, "concurrency": a.concurrency,
                "threads_total": threads, "ranks": "local processes over gloo, threads split evenly",
                "comm": "rank 0's collectives (all-reduces, step broadcast, logits gather), per engine step; their "
                        "time includes waiting for the slower rank",
                "load_average_1min": [round(load_before, 2), round(os.getloadavg()[0], 2)]}
    cmd = "make bench BENCH=tp" + (f" ARGS='{' '.join(argv)}'" if argv else "")
    print(f"wrote {write_results('tp', workload, rows, ratios, cmd)}")
    return 0
