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
    """cos/sin tables [max_positions, rotary_dim] in float32 (rotary_dim: head_dim times the
    config's partial_rotary_factor, if any).

    LongRoPE ("longrope", Phi-3's "su"): transformers picks the long factors for a whole forward
    call once the sequence passes original_max_position_embeddings. Here a position keeps one
    rotation: short factors below that length, long ones from it on. The two agree whenever the
    prompt fits in the original length (generation may run past it); a longer prompt would be
    rotated with the long factors throughout by transformers."""
    params = rope_parameters(config, layer_type)
    rope_type = params.get("rope_type", "default")
    rotary_dim = int(head_dim * params.get("partial_rotary_factor", 1.0))
    pos = torch.arange(max_positions, dtype=torch.float)
    if rope_type == "default":
        base = params["rope_theta"]
        inv_freq = 1.0 / (base ** (torch.arange(0, rotary_dim, 2, dtype=torch.float) / rotary_dim))
        freqs = pos[:, None] * inv_freq[None, :]
        scaling = 1.0
    elif rope_type == "dynamic":
        # Dynamic NTK rescales with the sequence length at run time; a static table would be wrong.
        raise ValueError("rope_type 'dynamic' is not supported")
    else:
        from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

        init = ROPE_INIT_FUNCTIONS[rope_type]
        kw = {} if layer_type is None else {"layer_type": layer_type}
        inv_freq, scaling = init(config, None, **kw)
        freqs = pos[:, None] * inv_freq.float()[None, :]
        if rope_type == "longrope":
            original = params["original_max_position_embeddings"]
            long_inv_freq, _ = init(config, None, seq_len=original + 1, **kw)
            long_freqs = pos[:, None] * long_inv_freq.float()[None, :]
            freqs = torch.where(pos[:, None] < original, freqs, long_freqs)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos() * scaling, emb.sin() * scaling
