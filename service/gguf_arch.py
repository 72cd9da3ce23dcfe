"""GGUF architecture -> transformers config: one small table per architecture.

`transformers` reads a GGUF's tensors (de-quantised, renamed, Gemma's +1 norms and llama.cpp's
q/k row interleave undone) and most of its metadata, but not every setting a family needs: it
reads no head_dim for Qwen3, no expert FFN size for the MoEs, no soft-caps for Gemma 2. Each
entry below names the `{arch}.` metadata keys read over transformers' own parse, the settings
llama.cpp hard-codes for that architecture (they are not in the file), and settings computed from
the others; the loader builds the config from that and hands it to transformers, which then
only loads the tensors into a model of the right shape. Where transformers cannot map the
tensors (Mixtral's stacked experts) or parses no GGUF of the architecture at all (`own_config`:
Gemma 1, Granite, OLMo 2, Command R, DeepSeek-V2/V3), service/gguf_tensors.py reads them.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common.errors import ModelLoadError

Settings = dict[str, Any]


@dataclass(frozen=True, slots=True)
class GGUFArch:
    keys: dict[str, str] = field(default_factory=dict)   # "{arch}." + key -> config attribute
    fixed: Settings = field(default_factory=dict)          # what llama.cpp assumes for the architecture
    tensors: dict[str, str] = field(default_factory=dict)  # small tensors holding settings (a list each)
    derived: Callable[[Settings], Settings] | None = None  # from the settings read so far
    model_type: str | None = None                          # transformers' model_type, where not the architecture's
    with_experts: GGUFArch | None = None                    # the entry for files with "{arch}.expert_count"
    present: dict[str, str] = field(default_factory=dict)  # tensor -> bool config attribute: whether the file has it
    own_config: bool = False   # transformers parses no GGUF of it: the config starts from _BASE_KEYS


def _gemma_attention_scale(big_layers: int) -> Callable[[Settings], Settings]:
    """llama.cpp scales Gemma 2/3 queries by 1/sqrt(head_dim), except in the 27B model (known by
    its layer count), which scales by 1/sqrt(hidden / heads) as its query_pre_attn_scalar says."""
    def derive(s: Settings) -> Settings:
        big = s["num_hidden_layers"] == big_layers
        return {"query_pre_attn_scalar": s["hidden_size"] // s["num_attention_heads"] if big else s["head_dim"]}
    return derive


def _gemma3(s: Settings) -> Settings:
    """The query scale as for Gemma 2, plus the global layers' linear RoPE scaling (4B and larger: factor 8;
    llama.cpp leaves the local layers unscaled, as transformers does)."""
    out = _gemma_attention_scale(62)(s)
    if s.get("rope_scaling_type") == "linear":
        out["rope_scaling"] = {"rope_type": "linear", "factor": float(s["rope_scaling_factor"])}
    return out


def _phi3_rope(s: Settings) -> Settings:
    """llama.cpp writes the rotated dimensions per head (transformers wants a fraction of head_dim)
    and LongRoPE's factors as the tensors rope_factors_long / rope_factors_short."""
    head_dim = s["hidden_size"] // s["num_attention_heads"]
    rope: Settings = {"rope_type": "default", "rope_theta": s.get("rope_theta", 10000.0),
                      "partial_rotary_factor": s.get("rope_dimension_count", head_dim) / head_dim}
    if "long_factor" in s:
        rope |= {"rope_type": "longrope", "long_factor": s["long_factor"], "short_factor": s["short_factor"],
                 "original_max_position_embeddings": s["original_max_position_embeddings"]}
        if "rope_attention_factor" in s:
            rope["attention_factor"] = float(s["rope_attention_factor"])
    return {"rope_parameters": rope}


# The keys transformers reads for every llama-like architecture it knows; Weft reads them itself
# for the architectures it does not (`own_config`). The token ids are what transformers puts in
# the config too.
_BASE_KEYS = {"context_length": "max_position_embeddings", "embedding_length": "hidden_size",
              "block_count": "num_hidden_layers", "feed_forward_length": "intermediate_size",
              "attention.head_count": "num_attention_heads", "attention.head_count_kv": "num_key_value_heads",
              "attention.key_length": "head_dim", "rope.freq_base": "rope_theta",
              "attention.layer_norm_rms_epsilon": "rms_norm_eps", "vocab_size": "vocab_size"}
_TOKEN_IDS = {"tokenizer.ggml.bos_token_id": "bos_token_id", "tokenizer.ggml.eos_token_id": "eos_token_id",
              "tokenizer.ggml.padding_token_id": "pad_token_id"}


def _own_settings(reader: Any, arch: str, entry: GGUFArch) -> Settings:
    """The config settings of an architecture transformers parses no GGUF of: the base keys, the
    token ids, the vocabulary size from the embedding where the file has no vocab_size key (llama.cpp's
    converters do not all write it), and tied embeddings where the file has no output.weight."""
    settings: Settings = {"model_type": entry.model_type}
    for key, attribute in {**{f"{arch}.{k}": v for k, v in _BASE_KEYS.items()}, **_TOKEN_IDS}.items():
        found = reader.get_field(key)
        if found is not None:
            settings[attribute] = found.contents()
    names = {tensor.name: tensor for tensor in reader.tensors}
    if "vocab_size" not in settings and "token_embd.weight" in names:
        settings["vocab_size"] = int(names["token_embd.weight"].shape[-1])   # GGUF dims: [hidden, vocab]
    settings["tie_word_embeddings"] = "output.weight" not in names
    # llama.cpp's RoPE base where a file has none (its Gemma converter writes none), whatever the
    # HF config's default.
    settings.setdefault("rope_theta", 10000.0)
    return settings


def _granite_attention_scale(s: Settings) -> Settings:
    """llama.cpp scales Granite's queries by 1/sqrt(head_dim) where the file has no attention.scale
    (transformers' default multiplier is 1)."""
    if "attention_multiplier" in s:
        return {}
    head_dim = s.get("head_dim") or s["hidden_size"] // s["num_attention_heads"]
    return {"attention_multiplier": head_dim ** -0.5}


def _deepseek2(s: Settings) -> Settings:
    """llama.cpp's DeepseekV2Model converter writes MLA as MQA (head_count_kv 1, key_length =
    latent + rope dims): the per-head sizes are the _mla keys and rope.dimension_count. The gating
    function tells V3 (sigmoid, with exp_probs_b) from V2 (softmax; llama.cpp's default where a
    file has no gating key); llama.cpp rotates DeepSeek's interleaved pairs, which is V3's
    rope_interleave. Expert groups: none written is one group. YaRN: the converter writes
    0.1 * mscale_all_dim as the log multiplier and no mscale, llama.cpp using it for both."""
    rope_dim = s["qk_rope_head_dim"]
    sigmoid = s.get("expert_gating_func") == 2   # gguf-py's ExpertGatingFuncType.SIGMOID
    groups = s.get("n_group") or 1
    out: Settings = {"model_type": "deepseek_v3" if sigmoid else "deepseek_v2",
                     "num_key_value_heads": s["num_attention_heads"], "head_dim": rope_dim,
                     "qk_nope_head_dim": s["mla_key_length"] - rope_dim,
                     "n_group": groups, "topk_group": s.get("topk_group") or groups}
    if sigmoid:
        out["rope_interleave"] = True
    else:
        out["topk_method"] = "group_limited_greedy" if groups > 1 else "greedy"
    if s.get("rope_scaling_type") == "yarn":
        mscale = s["rope_yarn_log_mul"] / 0.1
        out["rope_parameters"] = {
            "rope_type": "yarn", "rope_theta": s.get("rope_theta", 10000.0), "factor": float(s["rope_scaling_factor"]),
            "original_max_position_embeddings": s["rope_original_context"], "mscale": mscale, "mscale_all_dim": mscale}
    return out


_MOE_KEYS = {"expert_count": "num_experts", "expert_used_count": "num_experts_per_tok",
             "expert_feed_forward_length": "moe_intermediate_size"}
# llama.cpp's qwen2moe / qwen3moe graphs run every layer as MoE, with no sliding window.
_MOE_FIXED: Settings = {"decoder_sparse_step": 1, "mlp_only_layers": [], "use_sliding_window": False}

# llama.cpp files Mixtral under "llama" (its experts stacked; service/gguf_tensors.py reads them):
# every expert as wide as feed_forward_length, no sliding window in llama.cpp's llama graph.
_MIXTRAL = GGUFArch(
    keys={"expert_count": "num_local_experts", "expert_used_count": "num_experts_per_tok",
          "attention.key_length": "head_dim"},
    fixed={"sliding_window": None}, model_type="mixtral")

ARCHITECTURES: dict[str, GGUFArch] = {
    "llama": GGUFArch(with_experts=_MIXTRAL),
    "qwen2": GGUFArch(),
    "qwen3": GGUFArch(keys={"attention.key_length": "head_dim"}),
    "gemma2": GGUFArch(
        keys={"attention.key_length": "head_dim", "attention.sliding_window": "sliding_window",
              "attn_logit_softcapping": "attn_logit_softcapping",
              "final_logit_softcapping": "final_logit_softcapping"},
        derived=_gemma_attention_scale(46)),
    "gemma3": GGUFArch(
        keys={"attention.key_length": "head_dim", "attention.sliding_window": "sliding_window",
              "rope.scaling.type": "rope_scaling_type", "rope.scaling.factor": "rope_scaling_factor"},
        # llama.cpp: local layers' RoPE base 10000, every 6th layer global, no soft-caps.
        fixed={"rope_local_base_freq": 10000.0, "sliding_window_pattern": 6,
               "attn_logit_softcapping": None, "final_logit_softcapping": None},
        derived=_gemma3),
    "phi3": GGUFArch(
        keys={"rope.dimension_count": "rope_dimension_count", "attention.sliding_window": "sliding_window",
              "rope.scaling.original_context_length": "original_max_position_embeddings",
              "rope.scaling.attn_factor": "rope_attention_factor"},
        tensors={"rope_factors_long.weight": "long_factor", "rope_factors_short.weight": "short_factor"},
        derived=_phi3_rope),
    "qwen2moe": GGUFArch(
        keys={**_MOE_KEYS, "expert_shared_feed_forward_length": "shared_expert_intermediate_size"},
        fixed={**_MOE_FIXED, "norm_topk_prob": False}),
    "qwen3moe": GGUFArch(
        keys={**_MOE_KEYS, "attention.key_length": "head_dim"},
        fixed={**_MOE_FIXED, "norm_topk_prob": True}),
    # transformers reads no GGUF of these (Weft's config, service/gguf_tensors.py's tensors).
    "gemma": GGUFArch(own_config=True, model_type="gemma"),
    # Granite's four multipliers (gguf-py's Keys.LLM.EMBEDDING_SCALE, RESIDUAL_SCALE, LOGIT_SCALE
    # and Keys.Attention.SCALE; llama.cpp's GraniteModel converter writes each the checkpoint has).
    # A missing embedding / residual / logit scale keeps transformers' default, 1.
    "granite": GGUFArch(
        keys={"embedding_scale": "embedding_multiplier", "residual_scale": "residual_multiplier",
              "attention.scale": "attention_multiplier", "logit_scale": "logits_scaling"},
        # No key says whether a model has biases: llama.cpp loads them where the file has them.
        present={"blk.0.attn_q.bias": "attention_bias", "blk.0.ffn_up.bias": "mlp_bias"},
        own_config=True, model_type="granite", derived=_granite_attention_scale),
    # Post-norms only, q/k RMSNorm over all heads: tensors only (attn_q_norm / post_ffw_norm ...).
    "olmo2": GGUFArch(own_config=True, model_type="olmo2"),
    # Command R: LayerNorm (its eps under the LayerNorm key), the logit scale; Command R+'s
    # per-head q/k norms by the tensors present.
    "command-r": GGUFArch(
        keys={"attention.layer_norm_epsilon": "layer_norm_eps", "logit_scale": "logit_scale"},
        present={"blk.0.attn_q_norm.weight": "use_qk_norm"}, own_config=True, model_type="cohere"),
    # DeepSeek-V2 and V3 (llama.cpp files both as "deepseek2"; _deepseek2 picks which).
    "deepseek2": GGUFArch(
        keys={"attention.q_lora_rank": "q_lora_rank", "attention.kv_lora_rank": "kv_lora_rank",
              "attention.key_length_mla": "mla_key_length", "attention.value_length_mla": "v_head_dim",
              "rope.dimension_count": "qk_rope_head_dim", "expert_count": "n_routed_experts",
              "expert_used_count": "num_experts_per_tok", "expert_feed_forward_length": "moe_intermediate_size",
              "expert_shared_count": "n_shared_experts", "leading_dense_block_count": "first_k_dense_replace",
              "expert_weights_scale": "routed_scaling_factor", "expert_weights_norm": "norm_topk_prob",
              "expert_gating_func": "expert_gating_func", "expert_group_count": "n_group",
              "expert_group_used_count": "topk_group", "rope.scaling.type": "rope_scaling_type",
              "rope.scaling.factor": "rope_scaling_factor",
              "rope.scaling.original_context_length": "rope_original_context",
              "rope.scaling.yarn_log_multiplier": "rope_yarn_log_mul"},
        # What llama.cpp assumes where the converter wrote no key: no q LoRA (V2-Lite's attn_q),
        # no routed-weight scale, no renormalisation.
        fixed={"q_lora_rank": None, "routed_scaling_factor": 1.0, "norm_topk_prob": False},
        own_config=True, model_type="deepseek_v2", derived=_deepseek2),
    "starcoder2": GGUFArch(
        keys={"rope.freq_base": "rope_theta", "vocab_size": "vocab_size"},
        fixed={"sliding_window": None}),   # llama.cpp's starcoder2 attends to the whole context
}

# Read by Weft, not a transformers config attribute.
_SCRATCH = ("rope_dimension_count", "rope_scaling_type", "rope_scaling_factor", "rope_attention_factor",
            "long_factor", "short_factor", "mla_key_length", "expert_gating_func", "rope_original_context",
            "rope_yarn_log_mul")


def check_architecture(arch: Any, gguf: Path) -> GGUFArch:
    entry = ARCHITECTURES.get(arch) if isinstance(arch, str) else None
    if entry is None:
        raise ModelLoadError(f"{gguf}: unsupported GGUF architecture {arch!r}; "
                             f"supported: {', '.join(sorted(ARCHITECTURES))}")
    return entry


def gguf_config(gguf: Path) -> Any:
    """The transformers config of `gguf`: transformers' parse of its metadata, corrected by the
    architecture's table."""
    from gguf import GGUFReader
    from transformers import CONFIG_MAPPING
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    reader = GGUFReader(str(gguf))
    arch = reader.get_field("general.architecture").contents()
    entry = check_architecture(arch, gguf)
    if entry.with_experts is not None and reader.get_field(f"{arch}.expert_count") is not None:
        entry = entry.with_experts
    if entry.own_config:
        settings = _own_settings(reader, arch, entry)
    else:
        settings = dict(load_gguf_checkpoint(str(gguf), return_tensors=False)["config"])
    if entry.model_type is not None:
        settings["model_type"] = entry.model_type
    settings |= entry.fixed
    for key, attribute in entry.keys.items():
        found = reader.get_field(f"{arch}.{key}")
        if found is not None:
            settings[attribute] = found.contents()
    names = {tensor.name for tensor in reader.tensors}
    settings |= {attribute: name in names for name, attribute in entry.present.items()}
    for tensor in reader.tensors:
        if tensor.name in entry.tensors:
            settings[entry.tensors[tensor.name]] = [float(x) for x in tensor.data.reshape(-1)]
    if entry.derived is not None:
        settings |= entry.derived(settings)
    for name in _SCRATCH:
        settings.pop(name, None)
    model_type = settings.pop("model_type")
    return CONFIG_MAPPING[model_type](**settings)
