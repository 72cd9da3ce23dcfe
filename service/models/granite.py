"""Granite (3.x dense): Llama's layer with four multipliers from the config: embeddings times
embedding_multiplier, attention scale attention_multiplier, each residual branch times
residual_multiplier, logits divided by logits_scaling."""
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


class GraniteForCausalLM(CausalLM):
    def __init__(self, config: PretrainedConfig, max_positions: int) -> None:
        super().__init__(config, max_positions)
        c, eps, hidden = config, config.rms_norm_eps, config.hidden_size
        self.embed_multiplier = float(c.embedding_multiplier)
        self.logit_divisor = float(c.logits_scaling)
        self.add_rope("default", *rope_cos_sin(c, self.head_dim, max_positions))
        bias = bool(c.attention_bias)
        self.layers = nn.ModuleList(
            PreNormLayer(
                Attention(hidden, c.num_attention_heads, self.num_kv_heads, self.head_dim, qkv_bias=bias, o_bias=bias,
                          scale=float(c.attention_multiplier)),
                GatedMLP(hidden, c.intermediate_size, c.hidden_act, bias=bool(c.mlp_bias)),
                RMSNorm(hidden, eps), RMSNorm(hidden, eps), residual_scale=float(c.residual_multiplier))
            for _ in range(c.num_hidden_layers))
        self.norm = RMSNorm(hidden, eps)

    def load_layer(self, w: CheckpointWeights, prefix: str, layer: nn.Module) -> None:
        layer.self_attn.load_weights(w, prefix + "self_attn.")
        layer.mlp.load_weights(w, prefix + "mlp.")
        w.put_norm(layer.input_layernorm, prefix + "input_layernorm")
        w.put_norm(layer.post_attention_layernorm, prefix + "post_attention_layernorm")
