"""OLMo 2: norms on the way out of each branch only (no input norm), RMSNorm over all heads of q
and of k before the rotary embedding, RMSNorm scaling in float32."""
from __future__ import annotations

from torch import nn
from transformers import PretrainedConfig

from service.models.layers.attention import Attention
from service.models.layers.causal_lm import CausalLM
from service.models.layers.decoder import PostNormLayer
from service.models.layers.mlp import GatedMLP
from service.models.layers.norms import RMSNorm
from service.models.layers.rotary import rope_cos_sin
from service.models.layers.weights import CheckpointWeights


class Olmo2ForCausalLM(CausalLM):
    def __init__(self, config: PretrainedConfig, max_positions: int) -> None:
        super().__init__(config, max_positions)
        c, eps, hidden = config, config.rms_norm_eps, config.hidden_size
        self.add_rope("default", *rope_cos_sin(c, self.head_dim, max_positions))
        bias = bool(c.attention_bias)
        q_size, kv_size = c.num_attention_heads * self.head_dim, self.num_kv_heads * self.head_dim

        def norm(dim: int) -> RMSNorm:
            return RMSNorm(dim, eps, scale_in_float32=True)

        self.layers = nn.ModuleList(
            PostNormLayer(
                Attention(hidden, c.num_attention_heads, self.num_kv_heads, self.head_dim, qkv_bias=bias, o_bias=bias,
                          q_norm=norm(q_size), k_norm=norm(kv_size), qk_norm_per_head=False),
                GatedMLP(hidden, c.intermediate_size, c.hidden_act), norm(hidden), norm(hidden))
            for _ in range(c.num_hidden_layers))
        self.norm = norm(hidden)

    def load_layer(self, w: CheckpointWeights, prefix: str, layer: nn.Module) -> None:
        layer.self_attn.load_weights(w, prefix + "self_attn.")
        layer.mlp.load_weights(w, prefix + "mlp.")
        w.put_norm(layer.post_attention_layernorm, prefix + "post_attention_layernorm")
        w.put_norm(layer.post_feedforward_layernorm, prefix + "post_feedforward_layernorm")
