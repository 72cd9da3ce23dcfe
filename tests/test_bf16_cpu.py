"""dtype bfloat16 on CPU, Llama family (service/models/bf16_packed.py): bf16 weights, float32
activations; few-row steps stream the weights' bf16 bits (FMT_BF16) through the native loop."""
from __future__ import annotations

import random

import pytest
import torch

from decoding.sampling import SamplingParams
from kernels import cpu_native, quant
from service.llm import LLM
from tests.hf_reference import hf_greedy, load_hf

pytestmark = pytest.mark.skipif(cpu_native.lib() is None or not cpu_native.has_sgemm(),
                                reason="no native kernels (the bf16 copies are read by the native loop)")


def _prompts(vocab: int, lengths: list[int], seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(vocab) for _ in range(n)] for n in lengths]


def _hf_on_bf16_weights(path) -> torch.nn.Module:
    """transformers in float32 on the checkpoint's weights rounded to bf16: what we compute."""
    hf = load_hf(path)
    with torch.no_grad():
        for p in hf.parameters():
            p.copy_(p.bfloat16())
    return hf


def test_tiny_llama_bf16_matches_transformers(tiny_llama) -> None:
    llm = LLM(str(tiny_llama), dtype="bfloat16", progress=False, num_blocks=64)
    model = llm.engine.model
    assert model.bf16_weights and model.embed_tokens.weight.dtype == torch.float32
    assert llm.engine.runner.kv_tensor.dtype == torch.float32
    projections = [m for layer in model.layers for m in layer.projections()]
    assert all(m.packed.fmt == quant.FMT_BF16 for m in projections)
    assert model.lm_head_packed.fmt == quant.FMT_BF16
    for m in projections:
        assert torch.equal(quant.dequantize(m.packed), m.weight) and torch.equal(m.weight, m.weight.bfloat16().float())

    prompts = _prompts(llm.engine.vocab_size, [1, 7, 33, 80], seed=1)
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    steps = model.native.steps
    ours = [r.outputs[0].token_ids for r in llm.generate(prompts, params)]
    assert model.native.steps > steps   # the decode steps ran in the native loop
    hf32 = _hf_on_bf16_weights(tiny_llama)
    assert ours == [hf_greedy(hf32, p, 24) for p in prompts]
    hf16 = load_hf(tiny_llama, torch.bfloat16)
    # transformers in bf16 rounds every activation too: a random tiny model's near-tied logits part
    # ways after a while (the 80-token prompt at once); the short prompts' first 16 tokens agree.
    assert [o[:16] for o in ours[:3]] == [hf_greedy(hf16, p, 16) for p in prompts[:3]]
    assert llm.engine.pool_is_whole()


def test_smollm2_bf16_matches_transformers_bf16(smollm2_dir) -> None:
    """The default model with dtype bfloat16 gives transformers' bf16 tokens on chat prompts."""
    from tests.test_engine_exact import CHATS

    llm = LLM(str(smollm2_dir), dtype="bfloat16", progress=False, kv_cache_gb=0.25)
    assert llm.engine.model.bf16_weights
    tok = llm.tokenizer
    prompts = [tok.encode(tok.apply_chat_template([{"role": "user", "content": c}]), add_special_tokens=False)
               for c in CHATS[:3]]
    ours = [r.outputs[0].token_ids for r in llm.generate(prompts, SamplingParams(temperature=0, max_tokens=24,
                                                                                  ignore_eos=True))]
    hf16 = load_hf(smollm2_dir, torch.bfloat16)
    assert ours == [hf_greedy(hf16, p, 24) for p in prompts]
    assert llm.engine.pool_is_whole()


def test_tiny_llama_bf16_reads_the_packed_copies(tiny_llama, monkeypatch: pytest.MonkeyPatch) -> None:
    """Zeroing the bf16 copies (not the float32 weights) changes the tokens: the decode steps
    read them; WEFT_PACKED=0 (sgemm on the float32 weights) gives the tokens back."""
    llm = LLM(str(tiny_llama), dtype="bfloat16", progress=False, num_blocks=64)
    model = llm.engine.model
    prompts = _prompts(llm.engine.vocab_size, [5, 20], seed=3)
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    ref = [r.outputs[0].token_ids for r in llm.generate(prompts, params)]
    for layer in model.layers:
        for m in layer.projections():
            m.packed.data.zero_()
    assert [r.outputs[0].token_ids for r in llm.generate(prompts, params)] != ref
    monkeypatch.setenv("WEFT_PACKED", "0")
    assert [r.outputs[0].token_ids for r in llm.generate(prompts, params)] == ref
    assert llm.engine.pool_is_whole()


def test_other_families_keep_plain_bf16(tiny_model_factory) -> None:
    """A family without the native loop (Gemma) runs in bf16 as before."""
    llm = LLM(str(tiny_model_factory("gemma")), dtype="bfloat16", progress=False, num_blocks=64)
    assert not getattr(llm.engine.model, "bf16_weights", False)
    assert llm.engine.model.embed_tokens.weight.dtype == torch.bfloat16
    assert llm.engine.runner.kv_tensor.dtype == torch.bfloat16
