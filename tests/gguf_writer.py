"""Write a tiny HF checkpoint as a GGUF file (what llama.cpp's converter produces, for the few
architectures the tests need), so that GGUF loading is tested on more than the one shipped file.

Tensor names come from gguf-py's own HF -> GGUF name map; the tokenizer is the first tokens of
another GGUF's byte-level BPE (`small_tokenizer`: a few hundred tokens keep transformers' GGUF
tokenizer conversion, which walks every token and merge in Python, fast). Each 2-D weight is
stored in the quantisation type `qtypes` assigns it (gguf-py quantises Q8_0, Q4_0/1, Q5_0/1, F16,
BF16; the K-quants Q4_K, Q5_K, Q6_K are tests/kquants.py's, with llama.cpp's fallback type for rows
that are not whole 256-weight super-blocks), norms and 1-D tensors in F32.
"""
from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch


def _llama_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's converter interleaves each head's rotary halves in attn_q / attn_k (transformers'
    GGUF loader undoes it)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


Tensors = dict[str, np.ndarray]


def _permute_qk(cfg: dict[str, Any], weights: Tensors) -> Tensors:
    """llama.cpp's LlamaModel converter (and its subclasses': Mixtral, Granite) permutes q/k weights
    and biases; the other converters do not."""
    heads = {"q_proj": cfg["num_attention_heads"], "k_proj": cfg["num_key_value_heads"]}
    return {name: _llama_permute(w, heads[name.split(".")[-2]])
            if name.endswith(("q_proj.weight", "k_proj.weight", "q_proj.bias", "k_proj.bias"))
            else w for name, w in weights.items()}


def _gemma_norms(cfg: dict[str, Any], weights: Tensors) -> Tensors:
    """llama.cpp stores Gemma's (1 + w) RMSNorm weights with the 1 added (q/k norms too)."""
    return {name: w + 1 if name.endswith("norm.weight") else w for name, w in weights.items()}


def _num_experts(cfg: dict[str, Any]) -> int:
    """Qwen3-MoE's config.json spells it num_local_experts (num_experts is an alias); DeepSeek's
    n_routed_experts."""
    return cfg.get("num_experts") or cfg.get("n_routed_experts") or cfg["num_local_experts"]


def _stack_experts(cfg: dict[str, Any], weights: Tensors) -> Tensors:
    """llama.cpp stores each layer's experts as one [experts, rows, cols] tensor per projection
    (ffn_gate_exps / ffn_up_exps / ffn_down_exps); gguf-py names the stack after expert 0's path
    without the index (`mlp.experts.gate_proj`)."""
    out: Tensors = {}
    for name, w in weights.items():
        match = re.fullmatch(r"(.*\.experts)\.(\d+)\.(\w+\.weight)", name)
        if match is None:
            out[name] = w
        elif match[2] == "0":
            n = _num_experts(cfg)
            out[f"{match[1]}.{match[3]}"] = np.stack([weights[f"{match[1]}.{e}.{match[3]}"] for e in range(n)])
    return out


def _shared_gate_row(cfg: dict[str, Any], weights: Tensors) -> Tensors:
    """Qwen2-MoE's shared-expert gate [1, hidden] is the 1-D ffn_gate_inp_shexp in llama.cpp."""
    return {name: w.reshape(-1) if name.endswith("shared_expert_gate.weight") else w for name, w in weights.items()}


def _common_metadata(w: Any, cfg: dict[str, Any]) -> None:
    heads = cfg["num_attention_heads"]
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // heads
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(heads)
    w.add_head_count_kv(cfg["num_key_value_heads"])
    w.add_rope_freq_base(_rope_theta(cfg))
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_vocab_size(cfg["vocab_size"])
    if "rms_norm_eps" in cfg:
        w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])


def _rope_theta(cfg: dict[str, Any]) -> float:
    rope = cfg.get("rope_parameters") or {}
    rope = rope.get("full_attention", rope)    # Gemma 3: the global layers' base
    return float(cfg.get("rope_theta") or rope.get("rope_theta", 10000.0))


def _gemma2_metadata(w: Any, cfg: dict[str, Any]) -> None:
    w.add_attn_logit_softcapping(cfg["attn_logit_softcapping"])
    w.add_final_logit_softcapping(cfg["final_logit_softcapping"])
    w.add_sliding_window(cfg["sliding_window"])


def _gemma3_metadata(w: Any, cfg: dict[str, Any]) -> None:
    w.add_sliding_window(cfg["sliding_window"])
    rope = cfg["rope_parameters"]["full_attention"]
    if rope.get("rope_type") == "linear":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(rope["factor"])


def _phi3_metadata(w: Any, cfg: dict[str, Any]) -> None:
    """As llama.cpp's Phi3MiniModel: rotated dims per head; LongRoPE's factors as tensors and its
    attention factor computed from the context extension."""
    head_dim = cfg["hidden_size"] // cfg["num_attention_heads"]
    rope = cfg["rope_parameters"]
    w.add_rope_dimension_count(int(rope.get("partial_rotary_factor", 1.0) * head_dim))
    original = cfg.get("original_max_position_embeddings") or cfg["max_position_embeddings"]
    w.add_rope_scaling_orig_ctx_len(original)
    if rope.get("rope_type") == "longrope":
        scale = cfg["max_position_embeddings"] / original
        w.add_rope_scaling_attn_factors(1.0 if scale <= 1.0 else math.sqrt(1 + math.log(scale) / math.log(original)))
        w.add_tensor("rope_factors_long.weight", np.array(rope["long_factor"], dtype=np.float32))
        w.add_tensor("rope_factors_short.weight", np.array(rope["short_factor"], dtype=np.float32))
    if cfg.get("sliding_window"):
        w.add_sliding_window(cfg["sliding_window"])


def _moe_metadata(w: Any, cfg: dict[str, Any]) -> None:
    w.add_expert_count(_num_experts(cfg))
    w.add_expert_used_count(cfg["num_experts_per_tok"])
    w.add_expert_feed_forward_length(cfg["moe_intermediate_size"])
    if cfg.get("shared_expert_intermediate_size"):
        w.add_expert_shared_feed_forward_length(cfg["shared_expert_intermediate_size"])


def _deepseek2_metadata(w: Any, cfg: dict[str, Any]) -> None:
    """As llama.cpp's DeepseekV2Model.set_gguf_parameters (V2 and V3 alike): MLA written as MQA
    (head_count_kv 1, key_length = latent + rope dims, value_length = latent) with the per-head
    sizes under the _mla keys; the routing settings; the gating function (sigmoid: V3) read from
    scoring_func (transformers' config.json has none: V2 routes by softmax, V3 by sigmoid); YaRN
    with 0.1 * mscale_all_dim as its log multiplier. The expert groups as the base
    TextModel.set_gguf_parameters writes them: n_group / topk_group where the config has each.
    (gguf-py warns of and overwrites the base keys rewritten here, as in the converter.)"""
    rope_dim = cfg["qk_rope_head_dim"]
    w.add_head_count_kv(1)
    w.add_leading_dense_block_count(cfg["first_k_dense_replace"])
    if cfg.get("q_lora_rank") is not None:
        w.add_q_lora_rank(cfg["q_lora_rank"])
    w.add_kv_lora_rank(cfg["kv_lora_rank"])
    w.add_key_length(cfg["kv_lora_rank"] + rope_dim)
    w.add_value_length(cfg["kv_lora_rank"])
    w.add_key_length_mla(cfg["qk_nope_head_dim"] + rope_dim)
    w.add_value_length_mla(cfg["v_head_dim"])
    w.add_expert_feed_forward_length(cfg["moe_intermediate_size"])
    w.add_expert_count(cfg["n_routed_experts"])
    w.add_expert_used_count(cfg["num_experts_per_tok"])
    w.add_expert_shared_count(cfg["n_shared_experts"])
    w.add_expert_weights_scale(cfg["routed_scaling_factor"])
    w.add_expert_weights_norm(bool(cfg["norm_topk_prob"]))
    scoring = cfg.get("scoring_func") or ("sigmoid" if cfg["model_type"] == "deepseek_v3" else "softmax")
    w.add_expert_gating_func(gguf.ExpertGatingFuncType[scoring.upper()])
    if cfg.get("n_group") is not None:
        w.add_expert_group_count(cfg["n_group"])
    if cfg.get("topk_group") is not None:
        w.add_expert_group_used_count(cfg["topk_group"])
    w.add_rope_dimension_count(rope_dim)
    rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    if rope.get("rope_type", rope.get("type")) == "yarn" and "factor" in rope:
        w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        w.add_rope_scaling_factor(rope["factor"])
        w.add_rope_scaling_orig_ctx_len(rope["original_max_position_embeddings"])
        w.add_rope_scaling_yarn_log_mul(0.1 * rope["mscale_all_dim"])


def _deepseek2_tensors(cfg: dict[str, Any], weights: Tensors) -> Tensors:
    """llama.cpp's DeepseekV2Model.modify_tensors: kv_b_proj [heads * (nope + v), latent] split per
    head into k_b [heads, latent, nope] (transposed, for the absorbed MLA product) and v_b
    [heads, v, latent] (attn_k_b / attn_v_b; no attn_kv_b kept); e_score_correction_bias renamed
    e_score_correction.bias (exp_probs_b.bias). The rope dims stay as they are: llama.cpp rotates
    DeepSeek's interleaved pairs (its NORM rope type) as the checkpoint does."""
    nope, v_dim = cfg["qk_nope_head_dim"], cfg["v_head_dim"]
    out: Tensors = {}
    for name, w in weights.items():
        if name.endswith("e_score_correction_bias"):
            out[name.replace("e_score_correction_bias", "e_score_correction.bias")] = w
        elif name.endswith("kv_b_proj.weight"):
            kv_b = w.reshape(-1, nope + v_dim, w.shape[-1])
            out[name.replace("kv_b_proj", "k_b_proj")] = np.ascontiguousarray(kv_b[:, :nope].swapaxes(1, 2))
            out[name.replace("kv_b_proj", "v_b_proj")] = np.ascontiguousarray(kv_b[:, nope:])
        else:
            out[name] = w
    return out


def _mixtral_metadata(w: Any, cfg: dict[str, Any]) -> None:
    """llama.cpp's LlamaModel converter adds only these for Mixtral (each expert is
    feed_forward_length wide)."""
    w.add_expert_count(cfg["num_local_experts"])
    w.add_expert_used_count(cfg["num_experts_per_tok"])


def _granite_metadata(w: Any, cfg: dict[str, Any]) -> None:
    """llama.cpp's GraniteModel (a LlamaModel) adds the four multipliers."""
    w.add_embedding_scale(cfg["embedding_multiplier"])
    w.add_residual_scale(cfg["residual_multiplier"])
    w.add_attention_scale(cfg["attention_multiplier"])
    w.add_logit_scale(cfg["logits_scaling"])


def _command_r_metadata(w: Any, cfg: dict[str, Any]) -> None:
    """llama.cpp's CommandR2Model: the LayerNorm eps and the logit scale."""
    w.add_layer_norm_eps(cfg["layer_norm_eps"])
    w.add_logit_scale(cfg["logit_scale"])


def _starcoder2_metadata(w: Any, cfg: dict[str, Any]) -> None:
    w.add_layer_norm_eps(cfg["norm_epsilon"])


@dataclass(frozen=True)
class _Arch:
    """How llama.cpp's converter writes one HF model_type."""
    gguf: str                                                   # general.architecture
    metadata: Callable[[Any, dict[str, Any]], None] | None = None   # keys beyond _common_metadata
    tensors: tuple[Callable[[dict[str, Any], Tensors], Tensors], ...] = ()   # HF tensors -> llama.cpp's layout


_ARCHS: dict[str, _Arch] = {
    "llama": _Arch("llama", tensors=(_permute_qk,)),
    # Mixtral is a "llama" to llama.cpp: q/k permuted, block_sparse_moe.experts.E.w1/w3/w2 stacked.
    "mixtral": _Arch("llama", _mixtral_metadata, (_permute_qk, _stack_experts)),
    "qwen2": _Arch("qwen2"),
    "qwen3": _Arch("qwen3"),
    "gemma": _Arch("gemma", tensors=(_gemma_norms,)),
    "gemma2": _Arch("gemma2", _gemma2_metadata, (_gemma_norms,)),
    "gemma3_text": _Arch("gemma3", _gemma3_metadata, (_gemma_norms,)),
    "phi3": _Arch("phi3", _phi3_metadata),    # qkv_proj / gate_up_proj stay fused: attn_qkv / ffn_up
    "qwen2_moe": _Arch("qwen2moe", _moe_metadata, (_stack_experts, _shared_gate_row)),
    "qwen3_moe": _Arch("qwen3moe", _moe_metadata, (_stack_experts,)),
    "starcoder2": _Arch("starcoder2", _starcoder2_metadata),
    "granite": _Arch("granite", _granite_metadata, (_permute_qk,)),   # GraniteModel derives from LlamaModel
    "olmo2": _Arch("olmo2"),
    "cohere": _Arch("command-r", _command_r_metadata),   # tensors as they are (interleaved rotary in both)   # Olmo2Model: the base TextModel's keys, the tensors as they are
    # llama.cpp's DeepseekV2Model writes both DeepSeek-V2 and V3 as "deepseek2".
    "deepseek_v2": _Arch("deepseek2", _deepseek2_metadata, (_deepseek2_tensors, _stack_experts)),
    "deepseek_v3": _Arch("deepseek2", _deepseek2_metadata, (_deepseek2_tensors, _stack_experts)),
}


@dataclass(frozen=True)
class TokenizerFields:
    """GGUF tokenizer.* metadata: key -> (value, GGUFValueType, array item type or None)."""
    fields: dict[str, tuple[Any, Any, Any]]


def small_tokenizer(source_gguf: Path, vocab_size: int) -> TokenizerFields:
    """The first `vocab_size` tokens of `source_gguf`'s BPE vocabulary and the merges that build
    them (byte-level BPE numbers merge i's result after the byte tokens, so a prefix of the merges
    only makes tokens of the prefix), plus its other tokenizer settings."""

    reader = gguf.GGUFReader(str(source_gguf))
    fields: dict[str, tuple[Any, Any, Any]] = {}
    for name, field in reader.fields.items():
        if not name.startswith("tokenizer.") or name == "tokenizer.chat_template":
            continue
        vtype = field.types[0]
        sub = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        fields[name] = (field.contents(), vtype, sub)
    tokens = fields["tokenizer.ggml.tokens"][0][:vocab_size]
    known = set(tokens)
    merges = []
    for merge in fields["tokenizer.ggml.merges"][0]:
        if merge.replace(" ", "", 1) not in known:
            break
        merges.append(merge)
    fields["tokenizer.ggml.tokens"] = (tokens, *fields["tokenizer.ggml.tokens"][1:])
    fields["tokenizer.ggml.token_type"] = (fields["tokenizer.ggml.token_type"][0][:vocab_size],
                                           *fields["tokenizer.ggml.token_type"][1:])
    fields["tokenizer.ggml.merges"] = (merges, *fields["tokenizer.ggml.merges"][1:])
    return TokenizerFields(fields)


def write_gguf(hf_dir: Path, out: Path, tokenizer: TokenizerFields, qtype_of: Callable[[str], str]) -> Path:
    """`qtype_of(gguf_tensor_name)` -> a GGMLQuantizationType name for each 2-D tensor."""
    from safetensors.torch import load_file

    cfg = json.loads((hf_dir / "config.json").read_text())
    spec = _ARCHS[cfg["model_type"]]
    writer = gguf.GGUFWriter(str(out), spec.gguf)
    writer.add_name("tiny " + cfg["model_type"])
    _common_metadata(writer, cfg)
    if spec.metadata is not None:
        spec.metadata(writer, cfg)
    for name, (value, vtype, sub) in tokenizer.fields.items():
        writer.add_key_value(name, value, vtype, sub_type=sub)

    arch = next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == spec.gguf)
    name_map = gguf.get_tensor_name_map(arch, cfg["num_hidden_layers"])
    weights = {k: v.to(torch.float32).numpy() for k, v in load_file(str(hf_dir / "model.safetensors")).items()}
    for convert in spec.tensors:
        weights = convert(cfg, weights)
    for hf_name, data in weights.items():
        gguf_name = name_map.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise ValueError(f"no GGUF name for {hf_name}")
        _add(writer, gguf_name, data, qtype_of)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out


def _add(writer, name: str, data: np.ndarray, qtype_of: Callable[[str], str]) -> None:
    from gguf import GGMLQuantizationType as Q

    from tests import kquants

    # llama.cpp keeps norms F32, 2-D ones too (Command R's per-head q/k norms).
    qtype = Q[qtype_of(name)] if data.ndim >= 2 and not name.endswith("_norm.weight") else Q.F32
    if qtype.name in kquants.FALLBACK and data.shape[-1] % kquants.QK_K:
        qtype = Q[kquants.FALLBACK[qtype.name]]
    if data.shape[-1] % gguf.GGML_QUANT_SIZES[qtype][0]:
        qtype = Q.F16   # rows that are not whole blocks (Qwen2-MoE's shared expert: 48), as llama.cpp falls back
    if qtype == Q.F32:
        writer.add_tensor(name, data.astype(np.float32))
        return
    if qtype.name in kquants.BLOCK_BYTES:
        packed = kquants.quantize(data, qtype.name)
    else:
        packed = gguf.quants.quantize(data.astype(np.float32), qtype)
    writer.add_tensor(name, packed, raw_shape=packed.shape, raw_dtype=qtype)


def write_lora_gguf(hf_dir: Path, peft_dir: Path, out: Path, qtype: str = "F32") -> Path:
    """A PEFT adapter of `hf_dir` as llama.cpp's convert_lora_to_gguf.py writes it: general.type
    "adapter", adapter.type "lora", adapter.lora.alpha; each lora_A / lora_B under its base
    tensor's GGUF name + ".lora_a" / ".lora_b" (torch shapes, so GGUF's reversed dims are
    [in, r] and [r, out]); for llama, lora_B of q/k permuted as the base weights are (the
    converter's LoraTorchTensor applies the base model's reshape/swapaxes to B only)."""
    from safetensors.torch import load_file

    cfg = json.loads((hf_dir / "config.json").read_text())
    lora_cfg = json.loads((peft_dir / "adapter_config.json").read_text())
    spec = _ARCHS[cfg["model_type"]]
    writer = gguf.GGUFWriter(str(out), spec.gguf)
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(lora_cfg["lora_alpha"]))
    _common_metadata(writer, cfg)   # the converter writes the base model's parameters too
    arch = next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == spec.gguf)
    name_map = gguf.get_tensor_name_map(arch, cfg["num_hidden_layers"])
    heads = {"q_proj": cfg["num_attention_heads"], "k_proj": cfg["num_key_value_heads"]}
    for key, t in sorted(load_file(str(peft_dir / "adapter_model.safetensors")).items()):
        match = re.fullmatch(r"base_model\.model\.(.*)\.lora_([AB])\.weight", key)
        assert match is not None, key
        base_name = name_map.get_name(match.group(1) + ".weight", try_suffixes=(".weight",))
        data = t.to(torch.float32).numpy()
        module = match.group(1).split(".")[-1]
        if match.group(2) == "B" and _permute_qk in spec.tensors and module in heads:
            data = _llama_permute(data, heads[module])
        _add(writer, f"{base_name}.lora_{match.group(2).lower()}", data, lambda _: qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out
