"""Which layers attend through a sliding window, the two ways configs say it."""
from __future__ import annotations

from torch import nn
from transformers import PretrainedConfig

from service.models.layers.attention import Attention


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


def kv_window(model: nn.Module) -> int | None:
    """The window every attention layer of `model` looks through (the widest, if they differ), or
    None when some layer sees the whole sequence or attends another way (MLA): only then may a
    request's blocks that slid out of it be given back (service/engine/kv_cache.py)."""
    layers = getattr(model, "layers", None)
    windows = [m.window for m in model.modules() if isinstance(m, Attention)]
    if not windows or layers is None or len(windows) != len(layers) or None in windows:
        return None
    return max(windows)
