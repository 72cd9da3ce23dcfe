"""A GGUF's tensors -> a transformers model (float32), read by Weft where transformers cannot.

transformers maps the GGUF tensors of the architectures it knows; for the rest (Mixtral, which
llama.cpp files as a "llama" with stacked experts, and the families it reads no GGUF of: Gemma 1,
Granite, OLMo 2, Command R, DeepSeek-V2/V3) Weft reads them itself. One reader serves them all: the model is built
on the meta device from the config (service/gguf_arch.py), each of its state_dict names is
mapped to the GGUF name by gguf-py's own HF -> GGUF name map (the table llama.cpp's converter
names tensors with), the tensor de-quantised by gguf-py as transformers does, and the
architecture's `TensorLayout` undoes what llama.cpp's converter did to it. Every parameter must
come from the file and every tensor in the file must be used (a ModelLoadError names the first
few otherwise), so a file of an unexpected layout is refused rather than loaded half-random.
"""
from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from common.errors import ModelLoadError
from service.models.gguf_packed import rope_row_order


Joiner = Callable[[list[torch.Tensor]], torch.Tensor]


def _rows(parts: list[torch.Tensor]) -> torch.Tensor:
    """Stacked experts' projections one after the other along their rows (gate then up)."""
    return torch.cat(parts, dim=1)


def _mla_kv_b(parts: list[torch.Tensor]) -> torch.Tensor:
    """DeepSeek's kv_b_proj [heads * (nope + v), latent] from llama.cpp's attn_k_b [heads, latent,
    nope] (the converter transposed it) and attn_v_b [heads, v, latent]: each head's nope rows
    then its v rows, as the converter split them."""
    k_b, v_b = parts
    return torch.cat([k_b.transpose(1, 2), v_b], dim=1).reshape(-1, k_b.shape[1])


@dataclass(frozen=True, slots=True)
class TensorLayout:
    """How llama.cpp's converter (convert_hf_to_gguf.py) stored one architecture's HF tensors."""
    description: str                  # what such a file is, for error messages
    # LlamaModel and its subclasses (Mixtral, Granite) interleave each head's rotary halves in
    # q_proj / k_proj rows, weights and biases; the other converters store q/k as HF does.
    permute_qk: bool = False
    # Gemma's RMSNorm multiplies by (1 + w); llama.cpp's Gemma converters store 1 + w.
    norm_plus_one: bool = False
    # HF parameter (name after "model.layers.N.") -> the GGUF tensors (after "blk.N.") it is made
    # of and how: transformers fuses what llama.cpp keeps apart, or llama.cpp split it.
    fused: dict[str, tuple[tuple[str, ...], Joiner]] = field(default_factory=dict)
    # HF parameter suffix -> the name llama.cpp's converter renamed it to before gguf-py's map.
    renamed: dict[str, str] = field(default_factory=dict)


# transformers' model_type -> the layout of its GGUF tensors, for the model types Weft reads.
LAYOUTS: dict[str, TensorLayout] = {
    # Experts stacked per projection [experts, rows, cols]; transformers keeps gate and up as one
    # in-memory gate_up_proj, gate rows first.
    "mixtral": TensorLayout("a Mixtral GGUF (llama with stacked experts)", permute_qk=True,
                            fused={"mlp.experts.gate_up_proj": (("ffn_gate_exps", "ffn_up_exps"), _rows)}),
    # GemmaModel adds 1 to every norm.weight (as Gemma2Model / Gemma3Model do); no q/k permute.
    "gemma": TensorLayout("a Gemma GGUF", norm_plus_one=True),
    # GraniteModel derives from LlamaModel and keeps its q/k permute (biases included).
    "granite": TensorLayout("a Granite GGUF", permute_qk=True),
    # Olmo2Model and CommandR2Model (arch "command-r") write the HF tensors unchanged.
    "olmo2": TensorLayout("an OLMo 2 GGUF"),
    "cohere": TensorLayout("a Command R GGUF"),
    # llama.cpp's DeepseekV2Model ("deepseek2", V2 and V3): experts stacked, kv_b_proj split into
    # attn_k_b (transposed) / attn_v_b, e_score_correction_bias renamed e_score_correction.bias
    # (gguf-py: exp_probs_b); no q/k permute (llama.cpp rotates the interleaved pairs DeepSeek does).
    **dict.fromkeys(("deepseek_v2", "deepseek_v3"), TensorLayout(
        "a DeepSeek GGUF (deepseek2)",
        fused={"mlp.experts.gate_up_proj": (("ffn_gate_exps", "ffn_up_exps"), _rows),
               "self_attn.kv_b_proj.weight": (("attn_k_b", "attn_v_b"), _mla_kv_b)},
        renamed={"e_score_correction_bias": "e_score_correction.bias"})),
}

_LAYER = re.compile(r"model\.layers\.(\d+)\.(.+)")


def model_from_gguf(gguf: Path, config: Any) -> torch.nn.Module:
    """transformers' causal LM for `config` holding `gguf`'s de-quantised tensors."""
    import gguf as gguf_py
    from transformers import AutoModelForCausalLM

    layout = LAYOUTS[config.model_type]
    reader = gguf_py.GGUFReader(str(gguf))
    arch_name = reader.get_field("general.architecture").contents()
    arch = next(k for k, v in gguf_py.MODEL_ARCH_NAMES.items() if v == arch_name)
    name_map = gguf_py.get_tensor_name_map(arch, config.num_hidden_layers)
    in_file = {tensor.name: tensor for tensor in reader.tensors}

    with torch.device("meta"):   # no random initialisation: every parameter is replaced below
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    wanted = {name: _gguf_names(name, name_map, layout) for name in model.state_dict()}
    if config.tie_word_embeddings:   # llama.cpp writes no output.weight for a tied head
        wanted.pop("lm_head.weight", None)
    used = {g for names in wanted.values() if names for g in names}
    _check_names(gguf, layout, sorted(set(in_file) - used),
                 sorted(hf for hf, names in wanted.items() if not names or not set(names) <= set(in_file)))

    heads = {"q_proj": config.num_attention_heads, "k_proj": config.num_key_value_heads}
    state: dict[str, torch.Tensor] = {}
    for hf_name, names in wanted.items():
        parts = [_dequantised(in_file[n]) for n in names]
        layer = _LAYER.fullmatch(hf_name)
        data = layout.fused[layer[2]][1](parts) if layer is not None and layer[2] in layout.fused else parts[0]
        module = hf_name.split(".")[-2]
        if layout.permute_qk and module in heads:   # llama.cpp interleaved each head's rotary halves
            data = data[rope_row_order(data.shape[0], heads[module])]
        if layout.norm_plus_one and hf_name.endswith("norm.weight"):
            data = data - 1
        state[hf_name] = data
    if config.tie_word_embeddings:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    model.load_state_dict(state, strict=True, assign=True)
    if config.tie_word_embeddings:
        model.tie_weights()
    return model.eval()


def _gguf_names(hf_name: str, name_map: Any, layout: TensorLayout) -> tuple[str, ...] | None:
    """The GGUF tensor(s) holding HF parameter `hf_name`; None where gguf-py has no name for it.
    (gguf-py maps a parameter without ".weight", such as the stacked experts' down_proj, to the
    GGUF name without it too, while the file's tensor has one.)"""
    layer = _LAYER.fullmatch(hf_name)
    if layer is not None and layer[2] in layout.fused:
        return tuple(f"blk.{layer[1]}.{part}.weight" for part in layout.fused[layer[2]][0])
    for suffix, renamed in layout.renamed.items():
        if hf_name.endswith(suffix):
            hf_name = hf_name.removesuffix(suffix) + renamed
    mapped = name_map.get_name(hf_name, try_suffixes=(".weight", ".bias"))
    if mapped is None:
        return None
    return (mapped if mapped.endswith((".weight", ".bias")) else mapped + ".weight",)


def _dequantised(tensor: Any) -> torch.Tensor:
    from gguf import dequantize

    # np.array copies: the memory-mapped file is read-only.
    return torch.from_numpy(np.array(dequantize(tensor.data, tensor.tensor_type), dtype=np.float32))


def _check_names(gguf: Path, layout: TensorLayout, unknown: list[str], missing: list[str]) -> None:
    """Tensors the model has no place for (e.g. the per-expert ffn_gate.E tensors of Mixtral files
    written before llama.cpp stacked its experts) first, then parameters the file lacks."""
    if unknown:
        raise ModelLoadError(f"{gguf}: tensors {layout.description} does not hold: "
                             f"{', '.join(unknown[:8])}{' ...' if len(unknown) > 8 else ''}")
    if missing:
        raise ModelLoadError(f"{gguf}: {layout.description} without the tensors for {', '.join(missing[:8])}"
                             f"{' ...' if len(missing) > 8 else ''}")
