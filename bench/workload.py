"""The engine-core workload shared by the engine, grpc and http suites:
prompts of exactly ~100 tokens, output lengths spread over 16-256, greedy, EOS ignored so every
system produces exactly the same number of tokens per request."""
from __future__ import annotations

import random
from dataclasses import dataclass

TEXT = (
    "The history of weaving goes back thousands of years. Early looms were simple frames, and "
    "the weft thread was passed by hand over and under the warp. Later the flying shuttle and the "
    "Jacquard loom, which read patterns from punched cards, changed textile production and inspired "
    "the first programmable machines. Today engineers still borrow the words warp and weft when they "
    "describe how threads of work are interleaved on a processor, and how a scheduler packs many "
    "small tasks into one batch so that no cycle is wasted. Summarise the paragraph and continue it "
    "with three more facts about looms, numbered, in plain language for a curious reader."
)


@dataclass(slots=True)
class Item:
    prompt_ids: list[int]
    max_tokens: int


def make_workload(tokenizer, num_requests: int, prompt_len: int = 100, seed: int = 0,
                  min_out: int = 16, max_out: int = 256) -> list[Item]:
    ids = tokenizer.encode(TEXT, add_special_tokens=False)
    while len(ids) < prompt_len * 3:
        ids = ids + ids
    rng = random.Random(seed)
    items = []
    for i in range(num_requests):
        start = rng.randrange(0, len(ids) - prompt_len)
        # Spread output lengths evenly over [min_out, max_out] so each level sees the full range.
        frac = (i % num_requests) / max(1, num_requests - 1)
        items.append(Item(ids[start:start + prompt_len], int(min_out + frac * (max_out - min_out))))
    rng.shuffle(items)
    return items
