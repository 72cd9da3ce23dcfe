"""Model families beyond Llama (and the Llama family's sliding windows): greedy tokens through LLM.generate equal transformers' greedy
tokens for tiny random models of each family (written by transformers itself), alone and in a
batch of 8 mixed-length requests whose prefill is chunked and which the scheduler must preempt;
the block pool comes back whole. Sliding-window configs get prompts longer than their window;
MoE configs a batch whose tokens reach every expert of every layer."""
from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

from decoding.sampling import SamplingParams
from service.llm import LLM
from service.models.architectures import ARCHITECTURES
from service.models.registry import MODEL_CLASSES
from tests.hf_reference import hf_greedy, load_hf

NEW_TOKENS = 12
GREEDY = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True)
# Mixed lengths, two of them past the sliding windows below and past the chunk budget.
LENGTHS = [3, 70, 17, 40, 1, 33, 90, 8]
WINDOW = 24

# case id -> (tiny model kind, config overrides)
FAMILIES: dict[str, tuple[str, dict[str, Any]]] = {
    # The Llama class (native loop while every row fits its window, torch loop past it).
    "mistral-sliding": ("mistral", {"sliding_window": WINDOW}),
    "qwen2-sliding": ("qwen2", {"use_sliding_window": True, "sliding_window": WINDOW, "max_window_layers": 1}),
    "qwen3": ("qwen3", {}),
    "qwen3-sliding": ("qwen3", {"use_sliding_window": True, "sliding_window": WINDOW, "max_window_layers": 1}),
    "mixtral-sliding": ("mixtral", {"sliding_window": WINDOW}),
    "qwen2_moe": ("qwen2_moe", {}),
    "qwen3_moe-dense-layer-topk-norm": ("qwen3_moe", {"mlp_only_layers": [1], "norm_topk_prob": True}),
    "gemma": ("gemma", {}),
    # Caps low enough to bend the tiny model's scores and logits.
    "gemma2-sliding-softcaps": ("gemma2", {"sliding_window": WINDOW, "attn_logit_softcapping": 4.0,
                                           "final_logit_softcapping": 12.0}),
    # A sliding layer (local RoPE base) then a global one (its own base, linearly scaled).
    "gemma3-sliding-dual-rope": ("gemma3", {
        "sliding_window": WINDOW, "layer_types": ["sliding_attention", "full_attention"],
        "final_logit_softcapping": 12.0,
        "rope_parameters": {"sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
                            "full_attention": {"rope_type": "linear", "factor": 4.0, "rope_theta": 1_000_000.0}}}),
    # The language model of a multimodal checkpoint (vision tower left unread).
    "gemma3_mm-text": ("gemma3_mm", {"sliding_window": WINDOW, "layer_types": ["sliding_attention", "full_attention"]}),
    # The 90-token prompt fits in the original 96 positions; its generation runs past them.
    "phi3-longrope-partial-rotary": ("phi3", {
        "original_max_position_embeddings": 96,
        "rope_parameters": {"rope_type": "longrope", "rope_theta": 50_000.0, "partial_rotary_factor": 0.75,
                            "original_max_position_embeddings": 96,
                            "short_factor": [1.0, 1.1, 1.3, 1.7, 2.5, 4.0],
                            "long_factor": [1.0, 1.5, 3.0, 6.0, 12.0, 30.0]}}),
    "granite-multipliers-biases": ("granite", {
        "embedding_multiplier": 3.0, "attention_multiplier": 0.2, "residual_multiplier": 0.5, "logits_scaling": 2.0,
        "attention_bias": True, "mlp_bias": True}),
    "olmo2": ("olmo2", {}),
    "cohere-qk-norm": ("cohere", {"use_qk_norm": True}),
    "starcoder2-sliding": ("starcoder2", {"sliding_window": WINDOW}),
    "deepseek_v2-mla-group-limited": ("deepseek_v2", {"topk_method": "group_limited_greedy", "n_group": 2,
                                                      "topk_group": 1, "routed_scaling_factor": 1.5}),
    "deepseek_v3-mla-interleaved-rope": ("deepseek_v3", {}),
}
MOE_CASES = {"mixtral-sliding", "qwen2_moe", "qwen3_moe-dense-layer-topk-norm", "deepseek_v2-mla-group-limited",
             "deepseek_v3-mla-interleaved-rope"}


@dataclass
class Case:
    name: str
    path: Path
    hf: torch.nn.Module
    prompts: list[list[int]]
    expected: list[list[int]]


@pytest.fixture(scope="module", params=list(FAMILIES))
def case(request: pytest.FixtureRequest, tiny_model_factory) -> Case:
    kind, overrides = FAMILIES[request.param]
    path = tiny_model_factory(kind, **overrides)
    hf = load_hf(path)
    rng = random.Random(request.param)
    prompts = [[rng.randrange(1000, 40000) for _ in range(n)] for n in LENGTHS]
    expected = [hf_greedy(hf, p, NEW_TOKENS) for p in prompts]
    return Case(request.param, path, hf, prompts, expected)


@torch.inference_mode()
def test_alone_matches_transformers(case: Case) -> None:
    """One request at a time: a prompt past the sliding windows, then a short one whose
    log-probabilities are checked too (beyond the argmax: soft-capped and scaled logits)."""
    llm = LLM(str(case.path), dtype="float32", progress=False, num_blocks=64)
    assert llm.generate([case.prompts[1]], GREEDY)[0].outputs[0].token_ids == case.expected[1]
    prompt, want = case.prompts[2], case.expected[2]
    params = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True, logprobs=2)
    got = llm.generate([prompt], params)[0].outputs[0]
    assert got.token_ids == want
    logits = case.hf(torch.tensor([prompt + want[:6]])).logits[0, len(prompt) - 1:].float()
    ref = torch.log_softmax(logits, dim=-1)
    for i, step in enumerate(got.logprobs[:6]):
        assert step.logprob == pytest.approx(float(ref[i, want[i]]), abs=2e-4)
        for token, logprob in step.top:
            assert logprob == pytest.approx(float(ref[i, token]), abs=2e-4)
    assert llm.engine.pool_is_whole()


def test_batch_with_chunked_prefill_and_preemption_matches_transformers(case: Case) -> None:
    # 12 blocks of 16 tokens hold one long sequence but not the batch: the scheduler preempts;
    # a 32-token budget chunks the long prompts.
    llm = LLM(str(case.path), dtype="float32", progress=False, num_blocks=12, max_num_batched_tokens=32)
    results = llm.generate(case.prompts, GREEDY)
    assert [r.outputs[0].token_ids for r in results] == case.expected
    assert llm.engine.scheduler.num_preemptions > 0
    assert llm.engine.pool_is_whole()


@torch.inference_mode()
@pytest.mark.parametrize("case", sorted(MOE_CASES), indirect=True)
def test_moe_batch_reaches_every_expert(case: Case) -> None:
    """The batch above exercises every expert of every sparse layer: the expert ids transformers'
    own routers pick (each router returns logits, weights, expert ids), read with forward hooks."""
    routers = [m for m in case.hf.modules() if type(m).__name__.lower().endswith("topkrouter")]
    hit: list[set[int]] = [set() for _ in routers]
    hooks = [r.register_forward_hook(lambda mod, args, out, seen=seen: seen.update(out[2].flatten().tolist()))
             for r, seen in zip(routers, hit)]
    try:
        for prompt in case.prompts:
            case.hf(torch.tensor([prompt]))
    finally:
        for h in hooks:
            h.remove()
    assert routers and all(seen == set(range(r.num_experts)) for r, seen in zip(routers, hit)), hit


def test_every_architecture_has_a_class() -> None:
    assert set(MODEL_CLASSES) == set(ARCHITECTURES)


def test_lora_is_refused_beyond_llama(tiny_model_factory) -> None:
    from common.errors import ModelLoadError

    with pytest.raises(ModelLoadError, match="Llama family only"):
        LLM(str(tiny_model_factory("qwen3")), dtype="float32", progress=False, num_blocks=8, enable_lora=True)


def test_unused_checkpoint_tensor_is_refused(tiny_model_factory, tmp_path: Path) -> None:
    """A tensor the family would not use (here a bias Qwen3 does not have) is an error, not ignored."""
    import shutil

    from safetensors.torch import load_file, save_file

    from common.errors import ModelLoadError

    src = tiny_model_factory("qwen3")
    dst = tmp_path / "m"
    shutil.copytree(src, dst)
    tensors = load_file(str(dst / "model.safetensors"))
    tensors["model.layers.0.mlp.down_proj.bias"] = torch.zeros(64)
    save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ModelLoadError, match=r"does not use: model\.layers\.0\.mlp\.down_proj\.bias"):
        LLM(str(dst), dtype="float32", progress=False, num_blocks=8)


@pytest.mark.parametrize("case", ["qwen3"], indirect=True)
def test_qwen3_decodes_in_the_native_loop(case: Case) -> None:
    """Qwen3's short-row steps run in the Llama family's one-C-call loop (kernels/csrc/cpu_llama.c,
    per-head q/k norms included) and give transformers' greedy tokens, alone and batched."""
    from kernels import cpu_native

    if not cpu_native.has_sgemm():
        pytest.skip("no native kernels (compiler or sgemm_) here")
    llm = LLM(str(case.path), dtype="float32", progress=False, num_blocks=64)
    native = llm.engine.model.native
    before = native.steps
    assert llm.generate([case.prompts[2]], GREEDY)[0].outputs[0].token_ids == case.expected[2]
    alone = native.steps - before
    assert alone >= NEW_TOKENS - 1   # every decode step (the prompt's prefill may be one too)
    results = llm.generate(case.prompts, GREEDY)
    assert [r.outputs[0].token_ids for r in results] == case.expected
    assert native.steps - before > alone
    assert llm.engine.pool_is_whole()
