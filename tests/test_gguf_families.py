"""GGUF files beyond the shipped SmolLM2: tiny Llama and Qwen3 models written as GGUFs whose
tensors mix the quantisation types gguf-py can write (Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, F16, BF16),
loaded by Weft (converted once, then the family's forward pass; GGUF blocks packed where the fast
path takes them) give transformers' greedy tokens for the same GGUF."""
from __future__ import annotations

import zlib
from pathlib import Path

import pytest
import torch

from decoding.sampling import SamplingParams
from service.llm import LLM
from tests.gguf_writer import TokenizerFields, small_tokenizer, write_gguf
from tests.hf_reference import hf_greedy

VOCAB = 320   # the first 320 tokens of SmolLM2's vocabulary (byte tokens and the merges among them)
TYPES = ["Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "F16", "BF16"]


def _mixed_types(name: str) -> str:
    """A fixed spread of types over the tensors (the embedding Q8_0, as llama.cpp keeps it high)."""
    return "Q8_0" if name.startswith("token_embd") else TYPES[zlib.crc32(name.encode()) % len(TYPES)]


@pytest.fixture(scope="module")
def tokenizer(smollm2_gguf: Path) -> TokenizerFields:
    return small_tokenizer(smollm2_gguf, VOCAB)


@pytest.mark.parametrize("kind,overrides", [
    ("llama", {}),
    # transformers reads no head_dim from a Qwen3 GGUF: its default (128) it must be.
    ("qwen3", {"head_dim": 128}),
])
def test_mixed_quant_gguf_matches_transformers(kind: str, overrides: dict, tiny_model_factory,
                                               tokenizer: TokenizerFields, tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    from transformers import AutoModelForCausalLM

    monkeypatch.setenv("WEFT_CACHE_DIR", str(tmp_path / "cache"))
    gguf = write_gguf(tiny_model_factory(kind, vocab_size=VOCAB, **overrides), tmp_path / f"tiny-{kind}.Q8_0.gguf",
                      tokenizer, _mixed_types)
    hf = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file=gguf.name, dtype=torch.float32).eval()
    llm = LLM(str(gguf), dtype="float32", progress=False, num_blocks=32)
    assert type(llm.engine.model).__name__ == type(hf).__name__
    prompts = [list(range(40, 70)), list(range(200, 207))]
    results = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))
    for prompt, res in zip(prompts, results):
        assert res.outputs[0].token_ids == hf_greedy(hf, prompt, 12)
    assert llm.engine.pool_is_whole()

