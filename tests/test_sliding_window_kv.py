"""Sliding-window models give back the KV blocks that slid out of the window: a long request
holds about window / block_size blocks, not its whole length, and its greedy tokens still equal
transformers'. Models with a global layer (Gemma 2's alternation) keep every block."""
from __future__ import annotations

import random

import torch

from decoding.sampling import SamplingParams
from service.engine.kv_cache import FREED, KVCacheManager
from service.llm import LLM
from tests.hf_reference import hf_greedy, load_hf

WINDOW = 24
BLOCK = 16


def test_blocks_behind_the_window_go_back_to_the_pool() -> None:
    kv = KVCacheManager(num_blocks=8, block_size=BLOCK, window=WINDOW)
    assert kv.allocate("r", 40)
    assert kv.num_held("r") == 3
    # The next token (position 40) sees keys 17..40: block 0 (keys 0..15) is out of sight.
    assert kv.free_outside_window("r", 40) == 1
    assert kv.block_ids("r")[0] == FREED and kv.num_held("r") == 2 and kv.num_free_blocks == 6
    assert kv.free_outside_window("r", 40) == 0           # nothing twice
    assert kv.allocate("r", 56)
    assert kv.free_outside_window("r", 54) == 0           # position 54 sees 31..54: block 1 still in sight
    assert kv.free_outside_window("r", 55) == 1           # position 55 sees 32..55: block 1 goes
    kv.free("r")
    assert kv.num_free_blocks == 8


def test_no_window_keeps_every_block() -> None:
    kv = KVCacheManager(num_blocks=8, block_size=BLOCK)
    assert kv.allocate("r", 100)
    assert kv.free_outside_window("r", 100) == 0 and kv.num_held("r") == 7


@torch.inference_mode()
def test_long_request_holds_a_window_of_blocks_and_matches_transformers(tiny_model_factory) -> None:
    path = tiny_model_factory("mistral", sliding_window=WINDOW)
    prompt = [random.Random(7).randrange(1000, 40000) for _ in range(90)]
    new = 40
    want = hf_greedy(load_hf(path), prompt, new)
    llm = LLM(str(path), dtype="float32", progress=False, num_blocks=32, max_num_batched_tokens=32)
    assert llm.engine.kv.window == WINDOW
    engine = llm.engine
    engine.add_request("long", prompt, SamplingParams(temperature=0, max_tokens=new, ignore_eos=True))
    tokens: list[int] = []
    most_held = 0
    while engine.has_unfinished():
        for out in engine.step():
            tokens.extend(out.token_ids)
        most_held = max(most_held, engine.kv.num_held("long"))
    assert tokens == want
    # 130 tokens would take 9 blocks; the window (24) plus a 32-token chunk spans at most 5.
    assert most_held <= 5
    assert engine.pool_is_whole()


def test_a_global_layer_keeps_every_block(tiny_model_factory) -> None:
    path = tiny_model_factory("gemma2", sliding_window=WINDOW)
    llm = LLM(str(path), dtype="float32", progress=False, num_blocks=16)
    assert llm.engine.kv.window is None
