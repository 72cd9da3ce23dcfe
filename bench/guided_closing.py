"""The closing guarantee without a model: a compiled schema ends in a complete document before
max_tokens whatever the model picks.

For every schema Weft compiles, a "model" takes tokens from the budget-aware guide's mask
until the grammar ends or only EOS is left (it never picks EOS by choice): uniformly at random,
preferring tokens that open structure (`{`, `[`, `,`: outputs that keep growing), or repeating
its last token (the loops small models fall into). Jump-forward tokens are appended as the
engine does, and count. A run that reaches max_tokens without a complete output is `cut`. A
schema whose shortest output does not fit max_tokens (Weft refuses those requests, saying how
many tokens they need) runs with that many plus 64, as the end-to-end section retries it.
"""
from __future__ import annotations

import collections
import random
import time
import zlib
from typing import Any

import numpy as np
import torch

from common.errors import InvalidArgumentError
from decoding.guided import GuidedSpec

POLICIES = ("uniform", "open", "repeat")


def _run(guide: Any, words: int, eos_ids: set[int], policy: str, rng: random.Random, opening: np.ndarray) -> list[int]:
    row = torch.zeros(words, dtype=torch.int32)
    out: list[int] = []
    while len(out) < guide.max_tokens and not guide.is_terminated():
        forced = guide.forced_tokens()
        if forced:
            for t in forced[:guide.max_tokens - len(out)]:
                if not guide.advance(t):
                    return out
                out.append(t)
            continue
        guide.fill_bitmask(row)
        bits = np.unpackbits(row.numpy().view(np.uint8), bitorder="little")[:opening.shape[0]].astype(bool)
        ids = [t for t in np.flatnonzero(bits).tolist() if t not in eos_ids]
        if not ids:
            break
        if policy == "open" and rng.random() < 0.7 and (grow := [t for t in ids if opening[t]]):
            t = rng.choice(grow)
        elif policy == "repeat" and out and out[-1] in ids and rng.random() < 0.9:
            t = out[-1]
        else:
            t = rng.choice(ids)
        if not guide.advance(t):
            return out
        out.append(t)
    return out


def closing_stress(core: Any, docs: list[tuple[str, dict]], max_tokens: int, seeds: list[int]) -> dict:
    compiler = core.guide_compiler
    words = compiler.bitmask_words
    eos_ids = set(core.tokenizer.eos_token_ids)
    counts: collections.Counter = collections.Counter()
    cut_examples = []
    opening = None
    t0 = time.perf_counter()
    for name, doc in docs:
        try:
            grammar = compiler.compile_uncached(GuidedSpec("json_schema", doc["schema"]))
        except InvalidArgumentError:
            continue
        if opening is None:
            tb = grammar.budget_tables.token_bytes
            opening = np.array([bool(b) and any(c in b for c in b"{[,") for b in tb])
        limit = max_tokens
        need = grammar.new_guide(max_tokens=max_tokens).shortfall()
        if need is not None:
            limit = need + 64
            counts["retried_max_tokens"] += 1
        counts["schemas"] += 1
        for policy in POLICIES:
            for seed in seeds:
                guide = grammar.new_guide(max_tokens=limit)
                rng = random.Random(zlib.crc32(f"{name}|{policy}|{seed}".encode()))
                out = _run(guide, words, eos_ids, policy, rng, opening)
                counts["runs"] += 1
                if guide.is_complete() and len(out) < limit:
                    counts["complete"] += 1
                else:
                    counts["cut"] += 1
                    cut_examples.append({"name": name, "policy": policy, "seed": seed, "tokens": len(out),
                                         "text": core.tokenizer.decode(out)[-160:]})
    return {"max_tokens": max_tokens, "policies": list(POLICIES), "seeds": seeds, **counts,
            "wall_s": time.perf_counter() - t0, "cut_examples": cut_examples[:10]}
