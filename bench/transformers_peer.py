"""transformers `generate` as the engine bench's peer: static batches (every row of a batch runs
until its longest request is done, the next batch starts when it has answered), greedy."""
from __future__ import annotations

import time
from pathlib import Path

import torch

from bench.common import print_table, throughput_row
from bench.workload import Item


class _FirstToken:
    """A logits processor that only records when the first decoding step happens."""

    def __init__(self) -> None:
        self.t: float | None = None

    def __call__(self, input_ids, scores):
        if self.t is None:
            self.t = time.perf_counter()
        return scores


@torch.inference_mode()
def bench_transformers(hf_dir: Path, dtype: torch.dtype, workloads: dict[int, list[Item]],
                       system: str = "transformers") -> list[dict]:
    from transformers import AutoModelForCausalLM, LogitsProcessorList

    model = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=dtype).eval()
    model.generation_config.pad_token_id = model.generation_config.pad_token_id or 0

    def run_batch(batch: list[Item]) -> tuple[float, float]:
        ids = torch.tensor([i.prompt_ids for i in batch])  # equal lengths: no padding needed
        first = _FirstToken()
        t0 = time.perf_counter()
        longest = max(i.max_tokens for i in batch)
        model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=longest,
                       min_new_tokens=longest, logits_processor=LogitsProcessorList([first]))
        assert first.t is not None
        return t0, first.t

    run_batch(next(iter(workloads.values()))[:1])  # warm-up
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
        rows.append(throughput_row(system, conc, items, time.perf_counter() - start, ttfts, tpots))
        print_table(rows[-1:])
    return rows
