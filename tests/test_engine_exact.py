"""Greedy output equals transformers' greedy output, token for token."""
from __future__ import annotations

import random

import pytest

from decoding.sampling import SamplingParams
from service.llm import LLM
from tests.hf_reference import hf_greedy, load_hf


def _random_prompts(vocab: int, lengths: list[int], seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(vocab) for _ in range(n)] for n in lengths]


@pytest.mark.parametrize("kind", ["tiny_llama", "tiny_qwen2", "tiny_mistral"])
def test_tiny_models_match_transformers(kind: str, request: pytest.FixtureRequest) -> None:
    path = request.getfixturevalue(kind)
    llm = LLM(str(path), dtype="float32", progress=False, num_blocks=64)
    hf = load_hf(path)
    prompts = _random_prompts(llm.engine.vocab_size, [1, 7, 33, 80], seed=1)
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    results = llm.generate(prompts, params)
    for prompt, res in zip(prompts, results):
        assert res.outputs[0].token_ids == hf_greedy(hf, prompt, 24)
    assert llm.engine.pool_is_whole()


def test_untied_and_rope_scaled_llama_match_transformers(tiny_model_factory) -> None:
    path = tiny_model_factory(
        "llama",
        tie_word_embeddings=False,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                      "high_freq_factor": 4.0, "original_max_position_embeddings": 64},
    )
    llm = LLM(str(path), dtype="float32", progress=False, num_blocks=64)
    hf = load_hf(path)
    prompt = _random_prompts(llm.engine.vocab_size, [150], seed=2)[0]
    out = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=24, ignore_eos=True))[0]
    assert out.outputs[0].token_ids == hf_greedy(hf, prompt, 24)


CHATS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "List three uses of copper.",
    "Explain in one sentence why the sky is blue.",
]


def test_smollm2_matches_transformers(smollm2_dir) -> None:
    llm = LLM(str(smollm2_dir), dtype="float32", progress=False, kv_cache_gb=0.25)
    hf = load_hf(smollm2_dir)
    tok = llm.tokenizer
    prompts = [
        tok.encode(tok.apply_chat_template([{"role": "user", "content": c}]), add_special_tokens=False)
        for c in CHATS
    ]
    results = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=64, ignore_eos=True))
    for prompt, res in zip(prompts, results):
        assert res.outputs[0].token_ids == hf_greedy(hf, prompt, 64)
    assert llm.engine.pool_is_whole()
