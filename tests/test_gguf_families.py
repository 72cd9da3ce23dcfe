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



# model_type -> tiny-model overrides within what a GGUF of that architecture can say: llama.cpp
# scales Gemma queries by head_dim, runs Gemma 3 with every 6th layer global (6 layers: one global
# layer, with its own RoPE base), and every Qwen-MoE layer as MoE.
ARCH_CASES: dict[str, dict] = {
    "qwen3": {},   # head_dim 16, read from attention.key_length (transformers alone assumes 128)
    "gemma2": {"query_pre_attn_scalar": 16, "sliding_window": 8, "attn_logit_softcapping": 20.0,
               "final_logit_softcapping": 10.0},
    "gemma3": {"query_pre_attn_scalar": 16, "sliding_window": 8, "num_hidden_layers": 6, "rope_parameters": {
        "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
        "full_attention": {"rope_type": "linear", "factor": 4.0, "rope_theta": 1_000_000.0}}},
    "phi3": {"partial_rotary_factor": 0.5, "tie_word_embeddings": False, "sliding_window": 8},
    # Phi-3 with LongRoPE (its factors are tensors in a GGUF); the prompts fit the original 96 positions.
    "phi3-longrope": {"original_max_position_embeddings": 96, "rope_parameters": {
        "rope_type": "longrope", "rope_theta": 50_000.0, "partial_rotary_factor": 0.75,
        "original_max_position_embeddings": 96, "short_factor": [1.0, 1.1, 1.3, 1.7, 2.5, 4.0],
        "long_factor": [1.0, 1.5, 3.0, 6.0, 12.0, 30.0]}},
    "qwen2_moe": {},
    "qwen3_moe": {"norm_topk_prob": True},
    "starcoder2": {},
    "gemma": {},   # transformers reads no "gemma" GGUF: Weft's config and tensor reader
    # Multipliers away from 1 and q/k/v/o biases (q/k ones permuted as the weights are).
    "granite": {"embedding_multiplier": 3.0, "attention_multiplier": 0.2, "residual_multiplier": 0.5,
                "logits_scaling": 2.0, "attention_bias": True},
    "olmo2": {"tie_word_embeddings": False},   # OLMo 2 has a separate output.weight
    "cohere": {"use_qk_norm": True, "logit_scale": 0.5},   # Command R+'s per-head q/k norms (2-D, kept F32)
    "mixtral": {},   # a "llama" GGUF with stacked experts, read by service/gguf_tensors.py
    # "deepseek2" (both): MLA's kv_b_proj split into attn_k_b / attn_v_b, stacked experts, a dense
    # first layer; V2 softmax routing over expert groups with a weight scale (test_families' case),
    # V3 sigmoid routing (its gating key) with q LoRA and exp_probs_b.
    "deepseek_v2": {"topk_method": "group_limited_greedy", "n_group": 2, "topk_group": 1, "routed_scaling_factor": 1.5},
    "deepseek_v3": {},
    # YaRN as DeepSeek-V2 ships it (mscale = mscale_all_dim: the file holds one, as 0.1 * it; beta
    # 32 / 1, llama.cpp's defaults, as the converter writes none).
    "deepseek_v3-yarn": {"rope_parameters": {
        "rope_type": "yarn", "rope_theta": 10_000.0, "factor": 4.0, "original_max_position_embeddings": 128,
        "mscale": 0.707, "mscale_all_dim": 0.707, "beta_fast": 32.0, "beta_slow": 1.0}},
}


@pytest.mark.parametrize("kind", list(ARCH_CASES))
def test_gguf_architecture_matches_hf_checkpoint(kind: str, tiny_model_factory, tokenizer: TokenizerFields,
                                                 tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An F32 GGUF (llama.cpp's names, metadata and layout) of a tiny random model: Weft's greedy
    tokens and log-probabilities from it equal transformers' on the HF checkpoint it was written
    from, and the converted weights are that checkpoint's.

    The reference is the checkpoint, not transformers' own load of the GGUF: for these it
    leaves settings the file holds at their defaults (transformers 5.23: Gemma 2's query scale and
    soft-caps, Gemma 3's query scale and RoPE scaling, Phi-3's partial rotary, StarCoder2's RoPE base) or
    builds experts of the wrong size (both MoEs: it fails to load), which service/gguf_arch.py reads;
    a Mixtral ("llama" with stacked experts) it loads as a Llama without its experts; Gemma 1,
    Granite, OLMo 2 and Command R files it does not read at all (service/gguf_tensors.py does)."""
    from safetensors.torch import load_file

    from service.gguf_convert import gguf_cache_dir
    from tests.hf_reference import load_hf

    monkeypatch.setenv("WEFT_CACHE_DIR", str(tmp_path / "cache"))
    hf_dir = tiny_model_factory(kind.split("-")[0], vocab_size=VOCAB, **ARCH_CASES[kind])
    gguf = write_gguf(hf_dir, tmp_path / f"tiny-{kind}.F32.gguf", tokenizer, lambda name: "F32")
    hf = load_hf(hf_dir)
    llm = LLM(str(gguf), dtype="float32", progress=False, num_blocks=32)
    _assert_same_decoding(llm, hf)

    converted = load_file(str(gguf_cache_dir(gguf) / "model.safetensors"))
    for name, tensor in hf.state_dict().items():
        if name not in converted:   # a tied lm_head is not stored
            continue
        # Gemma's norms were stored as 1 + w: float32 rounding of 1 + w (half an ulp of 1) remains.
        atol = 2.0 ** -24 if kind.startswith("gemma") and name.endswith("norm.weight") else 0.0
        torch.testing.assert_close(converted[name], tensor, rtol=0.0, atol=atol, msg=name)


@pytest.mark.parametrize("kind", ["gemma", "gemma2", "gemma3", "phi3", "qwen2_moe", "qwen3_moe", "starcoder2", "granite",
                                  "olmo2", "cohere", "mixtral", "deepseek_v2", "deepseek_v3"])
def test_quantised_gguf_architecture_matches_transformers(kind: str, tiny_model_factory, tokenizer: TokenizerFields,
                                                          tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The same models with their 2-D and stacked-expert tensors in the mixed quantisation types:
    Weft from the GGUF equals transformers on the de-quantised weights (the converted directory;
    its config is what the F32 test above checks against the checkpoint)."""
    from service.gguf_convert import gguf_cache_dir
    from tests.hf_reference import load_hf

    monkeypatch.setenv("WEFT_CACHE_DIR", str(tmp_path / "cache"))
    hf_dir = tiny_model_factory(kind, vocab_size=VOCAB, **ARCH_CASES[kind])
    gguf = write_gguf(hf_dir, tmp_path / f"tiny-{kind}.Q8_0.gguf", tokenizer, _mixed_types)
    llm = LLM(str(gguf), dtype="float32", progress=False, num_blocks=32)
    _assert_same_decoding(llm, load_hf(gguf_cache_dir(gguf)))


def _assert_same_decoding(llm: LLM, hf: torch.nn.Module) -> None:
    """Greedy tokens and the first steps' log-probabilities (a tiny model's argmax can survive a
    wrong scale or soft-cap) equal `hf`'s, and the KV pool whole after."""
    assert type(llm.engine.model).__name__ == type(hf).__name__
    prompts = [list(range(40, 70)), list(range(200, 207))]
    results = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, logprobs=2))
    expected = [hf_greedy(hf, prompt, 12) for prompt in prompts]
    assert [res.outputs[0].token_ids for res in results] == expected
    for prompt, want, res in zip(prompts, expected, results):
        with torch.inference_mode():
            logits = hf(torch.tensor([prompt + want[:6]])).logits[0, len(prompt) - 1:]
        ref = torch.log_softmax(logits.float(), dim=-1)
        for i, step in enumerate(res.outputs[0].logprobs[:6]):
            for token, logprob in [(want[i], step.logprob), *step.top]:
                assert logprob == pytest.approx(float(ref[i, token]), abs=2e-4)
    assert llm.engine.pool_is_whole()


def _stub_gguf(path: Path, arch: str, tensors: tuple[str, ...] = ("token_embd.weight",), **ints: int) -> Path:
    """A GGUF with the given `{arch}.` integer keys and small zero tensors: enough to be refused."""
    import gguf as gguf_py

    writer = gguf_py.GGUFWriter(str(path), arch)
    for key, value in ints.items():
        writer.add_uint32(f"{arch}.{key}", value)
    for name in tensors:
        writer.add_tensor(name, torch.zeros(4, 8).numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_unknown_gguf_architecture_is_refused(tmp_path: Path) -> None:
    from common.errors import ModelLoadError
    from service.gguf_arch import ARCHITECTURES

    path = _stub_gguf(tmp_path / "tiny-bloom.gguf", "bloom")
    with pytest.raises(ModelLoadError, match="unsupported GGUF architecture 'bloom'; supported: ") as err:
        LLM(str(path), dtype="float32", progress=False)
    assert all(arch in str(err.value) for arch in ARCHITECTURES)


def test_per_expert_mixtral_gguf_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Mixtral GGUFs written before llama.cpp stacked experts hold blk.N.ffn_gate.E.weight per expert:
    not read (refused, naming the tensor), rather than loaded with experts missing."""
    from common.errors import ModelLoadError

    monkeypatch.setenv("WEFT_CACHE_DIR", str(tmp_path / "cache"))
    path = _stub_gguf(tmp_path / "tiny-mixtral.gguf", "llama", ("token_embd.weight", "blk.0.ffn_gate.0.weight"),
                      expert_count=4, expert_used_count=2)
    with pytest.raises(ModelLoadError, match=r"tensors a Mixtral GGUF \(llama with stacked experts\) does not hold: "
                                             r"blk\.0\.ffn_gate\.0\.weight$"):
        LLM(str(path), dtype="float32", progress=False)
