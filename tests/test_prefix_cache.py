"""Prefix caching: the block manager's rules, and outputs identical with and without it."""
from __future__ import annotations

import random

import pytest

from decoding.prefix_cache import extend_block_hashes, hash_block
from decoding.sampling import SamplingParams
from service.engine.kv_cache import KVCacheManager
from service.llm import LLM

BS = 4


def _admit(kv: KVCacheManager, rid: str, tokens: list[int], salt: str = "") -> list[int]:
    hashes: list[bytes] = []
    hit = kv.cached_prefix(tokens, hashes, salt)
    assert kv.allocate(rid, len(tokens), hit)
    kv.cache_full_blocks(rid, tokens, len(tokens), hashes, len(hit), salt)
    return hit


def test_hashes_chain_over_the_whole_prefix() -> None:
    a = extend_block_hashes([], [1, 2, 3, 4, 5, 6, 7, 8], 8, BS)
    b = extend_block_hashes([], [9, 2, 3, 4, 5, 6, 7, 8], 8, BS)
    assert len(a) == 2 and a[1] == hash_block(a[0], [5, 6, 7, 8])
    assert a[1] != b[1]  # same second block, different history -> different address
    assert extend_block_hashes([], [1, 2, 3], 3, BS) == []  # partial blocks have no address


def test_hit_takes_reference_and_free_returns_to_lru_tail() -> None:
    kv = KVCacheManager(num_blocks=8, block_size=BS)
    prompt = list(range(10))  # 2 full blocks + 2 tokens
    assert _admit(kv, "a", prompt) == []
    a_blocks = kv.block_ids("a")
    hit = _admit(kv, "b", prompt)
    assert hit == a_blocks[:2]
    assert [kv.pool.ref_cnt[b] for b in hit] == [2, 2]
    kv.free("a")
    assert [kv.pool.ref_cnt[b] for b in hit] == [1, 1]
    kv.free("b")
    assert kv.num_free_blocks == 8
    # Freed blocks go to the tail of the queue, tail-of-request first: the shared head is evicted last.
    order = list(kv.pool.free)
    assert order[-1] == hit[0] and order[-2] == hit[1]


def test_eviction_drops_the_hash() -> None:
    kv = KVCacheManager(num_blocks=4, block_size=BS)
    _admit(kv, "a", list(range(9)))  # 3 blocks, 2 of them full and cached
    kv.free("a")
    assert len(kv.pool.cached) == 2
    _admit(kv, "b", [100 + i for i in range(16)])  # needs all 4 blocks: evicts the cached ones
    assert all(h not in kv.pool.cached for h in extend_block_hashes([], list(range(9)), 8, BS))
    kv.free("b")
    assert _admit(kv, "c", list(range(9))) == []
    kv.free("c")
    assert kv.num_free_blocks == 4


def test_salts_separate_tenants() -> None:
    kv = KVCacheManager(num_blocks=16, block_size=BS)
    prompt = list(range(13))
    _admit(kv, "a", prompt, salt="tenant-1")
    assert _admit(kv, "b", prompt, salt="tenant-2") == []
    assert len(_admit(kv, "c", prompt, salt="tenant-1")) == 3
    for r in "abc":
        kv.free(r)
    assert kv.num_free_blocks == 16


def test_last_token_always_recomputed() -> None:
    kv = KVCacheManager(num_blocks=8, block_size=BS)
    _admit(kv, "a", list(range(8)))  # exactly two blocks
    assert len(_admit(kv, "b", list(range(8)))) == 1  # second block's last token must be recomputed
    kv.free("a"), kv.free("b")
    assert kv.num_free_blocks == 8


def test_hit_on_free_blocks_counts_against_capacity() -> None:
    kv = KVCacheManager(num_blocks=3, block_size=BS)
    _admit(kv, "a", list(range(9)))
    kv.free("a")
    hashes: list[bytes] = []
    hit = kv.cached_prefix(list(range(9)) + [50] * 8, hashes)
    assert len(hit) == 2
    assert not kv.allocate("b", 17, hit)  # 5 blocks needed, 3 exist
    assert kv.num_free_blocks == 3 and kv.pool.ref_cnt == [0, 0, 0]


# ---- end to end ----------------------------------------------------------------------------


def _shared_prefix_prompts(seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    system = [rng.randrange(1000, 40000) for _ in range(70)]
    prompts = []
    for plen in [3, 16, 32, 47, 70]:  # shorter than a block, exactly one/two blocks, odd, all of it
        for _ in range(3):
            prompts.append(system[:plen] + [rng.randrange(1000, 40000) for _ in range(rng.randrange(1, 20))])
    prompts.append(system[:32])  # a prompt that is entirely a cached prefix
    return prompts


GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)


@pytest.fixture(scope="module")
def reference(tiny_llama) -> list[list[int]]:
    llm = LLM(str(tiny_llama), dtype="float32", progress=False, num_blocks=256, enable_prefix_caching=False)
    return [r.outputs[0].token_ids for r in llm.generate(_shared_prefix_prompts(3), GREEDY)]


@pytest.mark.parametrize(
    "engine_args",
    [
        {"num_blocks": 256},                                     # plenty of room: many hits
        {"num_blocks": 24, "max_num_batched_tokens": 32},        # eviction pressure and preemption
        {"num_blocks": 256, "max_num_batched_tokens": 20},       # chunked prefill over cached prefixes
    ],
)
def test_outputs_identical_with_and_without_caching(tiny_llama, reference, engine_args) -> None:
    llm = LLM(str(tiny_llama), dtype="float32", progress=False, **engine_args)
    prompts = _shared_prefix_prompts(3)
    # One at a time first (later ones hit what earlier ones left), then all at once.
    sequential = [llm.generate([p], GREEDY)[0] for p in prompts]
    assert [r.outputs[0].token_ids for r in sequential] == reference
    assert sum(r.num_cached_tokens for r in sequential) > 0
    batched = llm.generate(prompts, GREEDY)
    assert [r.outputs[0].token_ids for r in batched] == reference
    assert llm.engine.pool_is_whole()
    stats = llm.engine.kv.stats
    assert 0 < stats.hits <= stats.queries


def test_n_samples_compute_the_prompt_once(tiny_llama) -> None:
    llm = LLM(str(tiny_llama), dtype="float32", progress=False, num_blocks=256)
    prompt = list(range(2000, 2050))  # 50 tokens: 3 full blocks of 16 shareable
    params = SamplingParams(n=4, temperature=1.0, seed=1, max_tokens=4, ignore_eos=True)
    res = llm.generate([prompt], params)[0]
    assert len(res.outputs) == 4
    # One sample computes the prompt; each of the other three finds its 48 block-aligned tokens cached.
    assert llm.engine.kv.stats.hits == 3 * 48
    assert llm.engine.pool_is_whole()


def test_reset_prefix_cache(tiny_llama) -> None:
    llm = LLM(str(tiny_llama), dtype="float32", progress=False, num_blocks=64)
    prompt = list(range(3000, 3040))
    assert llm.generate([prompt], GREEDY)[0].num_cached_tokens == 0
    assert llm.generate([prompt], GREEDY)[0].num_cached_tokens == 32
    llm.engine.reset_prefix_cache()
    assert llm.generate([prompt], GREEDY)[0].num_cached_tokens == 0


def test_offline_generate_keeps_salts_apart(tiny_llama) -> None:
    """LLM.generate's cache_salt: a prompt cached under one salt is a miss under another and
    without one, a hit under the same."""
    llm = LLM(str(tiny_llama), dtype="float32", progress=False, num_blocks=64)
    prompt = list(range(3100, 3140))
    assert llm.generate([prompt], GREEDY, cache_salt="a")[0].num_cached_tokens == 0
    assert llm.generate([prompt], GREEDY, cache_salt="b")[0].num_cached_tokens == 0
    assert llm.generate([prompt], GREEDY)[0].num_cached_tokens == 0
    assert llm.generate([prompt], GREEDY, cache_salt="a")[0].num_cached_tokens == 32


def test_caching_can_be_turned_off(tiny_llama) -> None:
    llm = LLM(str(tiny_llama), dtype="float32", progress=False, num_blocks=64, enable_prefix_caching=False)
    prompt = list(range(3000, 3040))
    llm.generate([prompt], GREEDY)
    assert llm.generate([prompt], GREEDY)[0].num_cached_tokens == 0
