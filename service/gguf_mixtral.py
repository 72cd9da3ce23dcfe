"""llama.cpp's Mixtral GGUF -> transformers' MixtralForCausalLM (float32).

llama.cpp files Mixtral under architecture "llama": attention as a Llama's (q/k rows interleaved
per head), each layer's router as ffn_gate_inp and its experts stacked, one [experts, rows, cols]
tensor per projection (ffn_gate_exps / ffn_up_exps / ffn_down_exps). transformers reads a "llama"
GGUF into a Llama only (the expert tensors would be dropped, the MLPs left random), so Weft reads
these tensors itself: de-quantised by gguf-py as transformers does, q/k rows put back in HF order,
gate and up stacked as transformers' in-memory `gate_up_proj` (gate rows first).
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

from common.errors import ModelLoadError
from service.models.gguf_packed import rope_row_order

# blk.N.<name>.weight -> model.layers.N.<HF name> (transformers' in-memory names: the stacked
# experts are parameters without a ".weight").
_LAYER_TENSORS = {
    "attn_norm": "input_layernorm.weight",
    "attn_q": "self_attn.q_proj.weight",
    "attn_k": "self_attn.k_proj.weight",
    "attn_v": "self_attn.v_proj.weight",
    "attn_output": "self_attn.o_proj.weight",
    "ffn_norm": "post_attention_layernorm.weight",
    "ffn_gate_inp": "mlp.gate.weight",
    "ffn_down_exps": "mlp.experts.down_proj",
}
_GLOBAL_TENSORS = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
                   "output.weight": "lm_head.weight"}
_LAYER_NAME = re.compile(r"blk\.(\d+)\.(\w+)\.weight")


def mixtral_from_gguf(gguf: Path, config: Any) -> torch.nn.Module:
    """transformers' MixtralForCausalLM for `config` holding the GGUF's de-quantised tensors.
    A tensor the file lacks or one Weft does not know (e.g. the per-expert ffn_gate.E tensors of
    files written before llama.cpp stacked its experts) is a ModelLoadError naming it."""
    from transformers import MixtralForCausalLM

    state = _hf_tensors(gguf, config)
    if config.tie_word_embeddings and "model.embed_tokens.weight" in state:
        state.setdefault("lm_head.weight", state["model.embed_tokens.weight"])
    with torch.device("meta"):   # no random initialisation: every parameter is replaced below
        model = MixtralForCausalLM(config)
    expected = set(model.state_dict())
    _check_names(gguf, expected, state)
    model.load_state_dict(state, strict=True, assign=True)
    return model.to(torch.float32).eval()


def _hf_tensors(gguf: Path, config: Any) -> dict[str, torch.Tensor]:
    """The GGUF's tensors under transformers' Mixtral names; names Weft does not know keep their
    GGUF name (so that `_check_names` reports them)."""
    from gguf import GGUFReader, dequantize

    heads = {"attn_q": config.num_attention_heads, "attn_k": config.num_key_value_heads}
    state: dict[str, torch.Tensor] = {}
    gate_up: dict[str, dict[str, torch.Tensor]] = {}   # layer prefix -> {"gate"/"up": stacked experts}
    for tensor in GGUFReader(str(gguf)).tensors:
        data = torch.from_numpy(np.array(dequantize(tensor.data, tensor.tensor_type), dtype=np.float32))  # a copy: the file is read-only
        match = _LAYER_NAME.fullmatch(tensor.name)
        if match is None:
            state[_GLOBAL_TENSORS.get(tensor.name, tensor.name)] = data
            continue
        prefix, kind = f"model.layers.{match[1]}.", match[2]
        if kind in heads:   # llama.cpp's converter interleaved each head's rotary halves
            data = data[rope_row_order(data.shape[0], heads[kind])]
        if kind in ("ffn_gate_exps", "ffn_up_exps"):
            gate_up.setdefault(prefix, {})[kind] = data
        else:
            state[prefix + _LAYER_TENSORS[kind] if kind in _LAYER_TENSORS else tensor.name] = data
    for prefix, parts in gate_up.items():
        if len(parts) == 2:   # one of the pair alone leaves gate_up_proj missing, which is reported
            state[prefix + "mlp.experts.gate_up_proj"] = torch.cat([parts["ffn_gate_exps"], parts["ffn_up_exps"]], dim=1)
    return state


def _check_names(gguf: Path, expected: set[str], state: dict[str, torch.Tensor]) -> None:
    unknown = sorted(set(state) - expected)
    if unknown:
        raise ModelLoadError(f"{gguf}: tensors a Mixtral GGUF (llama with stacked experts) does not hold: "
                             f"{', '.join(unknown[:8])}{' ...' if len(unknown) > 8 else ''}")
    missing = sorted(expected - set(state))
    if missing:
        raise ModelLoadError(f"{gguf}: Mixtral GGUF without the tensors for {', '.join(missing[:8])}"
                             f"{' ...' if len(missing) > 8 else ''}")
