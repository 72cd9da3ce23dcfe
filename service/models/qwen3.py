"""Qwen3: Llama's layer with an RMSNorm on each head of q and k before the rotary embedding.
Steps of short rows run in the Llama family's one-C-call loop (llama_native.py), q/k norms included."""
from __future__ import annotations

import torch
from torch import nn
from transformers import PretrainedConfig

from kernels.attention import AttentionMetadata

from service.models.layers.attention import Attention
from service.models.layers.causal_lm import CausalLM
from service.models.layers.decoder import PreNormLayer
from service.models.layers.mlp import GatedMLP
from service.models.layers.norms import RMSNorm
from service.models.layers.rotary import rope_cos_sin
from service.models.layers.weights import CheckpointWeights
from service.models.layers.windows import windows_by_layer_type
from service.models.llama_native import NativeLayers


def qk_norm_attention(config: PretrainedConfig, head_dim: int, window: int | None) -> Attention:
    eps = config.rms_norm_eps
    bias = bool(getattr(config, "attention_bias", False))
    return Attention(config.hidden_size, config.num_attention_heads, config.num_key_value_heads, head_dim,
                     qkv_bias=bias, o_bias=bias, window=window,
                     q_norm=RMSNorm(head_dim, eps), k_norm=RMSNorm(head_dim, eps))


class Qwen3ForCausalLM(CausalLM):
    def __init__(self, config: PretrainedConfig, max_positions: int) -> None:
        super().__init__(config, max_positions)
        eps, hidden = config.rms_norm_eps, config.hidden_size
        self.add_rope("default", *rope_cos_sin(config, self.head_dim, max_positions))
        windows = windows_by_layer_type(config)
        self.layers = nn.ModuleList(
            PreNormLayer(qk_norm_attention(config, self.head_dim, window),
                         GatedMLP(hidden, config.intermediate_size, config.hidden_act),
                         RMSNorm(hidden, eps), RMSNorm(hidden, eps))
            for window in windows)
        self.norm = RMSNorm(hidden, eps)
        # The native loop attends to the whole context (only steps within every window take it)
        # and computes silu MLPs only.
        self.min_window = min((w for w in windows if w), default=None)
        self.native = NativeLayers() if config.hidden_act == "silu" else None

    # The default rotary tables under the names the native loop reads.
    @property
    def rope_cos(self) -> torch.Tensor:
        return self.rope_cos_default

    @property
    def rope_sin(self) -> torch.Tensor:
        return self.rope_sin_default

    def native_layers(
        self, h: torch.Tensor, positions: torch.Tensor, kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
        slot_mapping: torch.Tensor, meta: AttentionMetadata,
    ) -> torch.Tensor | None:
        if self.native is None or (self.min_window is not None and max(meta.seq_lens) > self.min_window):
            return None
        return self.native(self, h, positions, kv_caches, slot_mapping, meta)

    def load_layer(self, w: CheckpointWeights, prefix: str, layer: nn.Module) -> None:
        layer.self_attn.load_weights(w, prefix + "self_attn.")
        layer.mlp.load_weights(w, prefix + "mlp.")
        w.put_named(layer.input_layernorm.weight, prefix + "input_layernorm.weight")
        w.put_named(layer.post_attention_layernorm.weight, prefix + "post_attention_layernorm.weight")
