"""Which layers attend through a sliding window, the two ways configs say it."""
from __future__ import annotations

from transformers import PretrainedConfig


def windows_by_layer_type(config: PretrainedConfig) -> list[int | None]:
    """`layer_types` marks the sliding layers (Qwen2/Qwen3 derive it from use_sliding_window and
    max_window_layers, Gemma 2/3 alternate); None for the global ones."""
    types = getattr(config, "layer_types", None) or ["full_attention"] * config.num_hidden_layers
    window = getattr(config, "sliding_window", None)
    return [window if t == "sliding_attention" and window else None for t in types]


def window_everywhere(config: PretrainedConfig) -> int | None:
    """Every layer windowed when the config sets sliding_window (Mistral, Mixtral, Phi-3,
    StarCoder2, Qwen3-MoE, which clears it unless use_sliding_window)."""
    return getattr(config, "sliding_window", None) or None
