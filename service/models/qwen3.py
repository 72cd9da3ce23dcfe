"""Qwen3: Llama's layer with an RMSNorm on each head of q and k before the rotary embedding."""
from __future__ import annotations

from torch import nn
from transformers import PretrainedConfig

from service.models.layers.attention import Attention
from service.models.layers.causal_lm import CausalLM
from service.models.layers.decoder import PreNormLayer
from service.models.layers.mlp import GatedMLP
from service.models.layers.norms import RMSNorm
from service.models.layers.rotary import rope_cos_sin
from service.models.layers.weights import CheckpointWeights
from service.models.layers.windows import windows_by_layer_type


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
        self.layers = nn.ModuleList(
            PreNormLayer(qk_norm_attention(config, self.head_dim, window),
                         GatedMLP(hidden, config.intermediate_size, config.hidden_act),
                         RMSNorm(hidden, eps), RMSNorm(hidden, eps))
            for window in windows_by_layer_type(config))
        self.norm = RMSNorm(hidden, eps)

    def load_layer(self, w: CheckpointWeights, prefix: str, layer: nn.Module) -> None:
        layer.self_attn.load_weights(w, prefix + "self_attn.")
        layer.mlp.load_weights(w, prefix + "mlp.")
        w.put_named(layer.input_layernorm.weight, prefix + "input_layernorm.weight")
        w.put_named(layer.post_attention_layernorm.weight, prefix + "post_attention_layernorm.weight")
