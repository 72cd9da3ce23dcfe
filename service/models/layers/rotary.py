"""Rotary position tables: cos/sin [max_positions, head_dim] computed the way transformers does,
for a config's RoPE settings (or one layer type's, when a family keeps several: Gemma 3's local
and global bases)."""
from __future__ import annotations

import torch
from transformers import PretrainedConfig


def rope_parameters(config: PretrainedConfig, layer_type: str | None = None) -> dict:
    """transformers 5 keeps RoPE settings in `rope_parameters` (per layer type for some families);
    older configs in rope_theta / rope_scaling."""
    params = getattr(config, "rope_parameters", None)
    if params:
        if layer_type is not None and isinstance(params.get(layer_type), dict):
            return dict(params[layer_type])
        return dict(params)
    params = dict(getattr(config, "rope_scaling", None) or {})
    params.setdefault("rope_type", params.pop("type", "default"))
    params.setdefault("rope_theta", getattr(config, "rope_theta", 10000.0))
    return params


def rope_cos_sin(
    config: PretrainedConfig, head_dim: int, max_positions: int, layer_type: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables [max_positions, head_dim] in float32."""
    params = rope_parameters(config, layer_type)
    rope_type = params.get("rope_type", "default")
    if rope_type == "default":
        base = params["rope_theta"]
        inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float) / head_dim))
        scaling = 1.0
    else:
        if rope_type in ("dynamic", "longrope"):
            # Both choose their frequencies from the length of the whole sequence at run time
            # (transformers' dynamic_rope_update); a table fixed per position would be wrong.
            raise ValueError(f"rope_type {rope_type!r} is not supported")
        from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

        if layer_type is None:
            inv_freq, scaling = ROPE_INIT_FUNCTIONS[rope_type](config, None)
        else:
            inv_freq, scaling = ROPE_INIT_FUNCTIONS[rope_type](config, None, layer_type=layer_type)
    pos = torch.arange(max_positions, dtype=torch.float)
    freqs = pos[:, None] * inv_freq.float()[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos() * scaling, emb.sin() * scaling
