"""StarCoder2: LayerNorms with biases, a plain (ungated) MLP c_fc -> act -> c_proj, biases on
every projection (use_bias), every layer windowed when the config sets sliding_window."""
from __future__ import annotations

from torch import nn
from transformers import PretrainedConfig

from service.models.layers.attention import Attention
from service.models.layers.causal_lm import CausalLM
from service.models.layers.decoder import PreNormLayer
from service.models.layers.mlp import MLP
from service.models.layers.norms import LayerNorm
from service.models.layers.rotary import rope_cos_sin
from service.models.layers.weights import CheckpointWeights
from service.models.layers.windows import window_everywhere


class Starcoder2ForCausalLM(CausalLM):
    def __init__(self, config: PretrainedConfig, max_positions: int) -> None:
        super().__init__(config, max_positions)
        c, eps, hidden, bias = config, config.norm_epsilon, config.hidden_size, bool(config.use_bias)
        self.add_rope("default", *rope_cos_sin(c, self.head_dim, max_positions))
        window = window_everywhere(c)
        self.layers = nn.ModuleList(
            PreNormLayer(
                Attention(hidden, c.num_attention_heads, self.num_kv_heads, self.head_dim, qkv_bias=bias, o_bias=bias,
                          window=window),
                MLP(hidden, c.intermediate_size, c.hidden_act, bias), LayerNorm(hidden, eps), LayerNorm(hidden, eps))
            for _ in range(c.num_hidden_layers))
        self.norm = LayerNorm(hidden, eps)

    def load_layer(self, w: CheckpointWeights, prefix: str, layer: nn.Module) -> None:
        layer.self_attn.load_weights(w, prefix + "self_attn.")
        layer.mlp.load_weights(w, prefix + "mlp.", ("c_fc", "c_proj"))
        w.put_norm(layer.input_layernorm, prefix + "input_layernorm")
        w.put_norm(layer.post_attention_layernorm, prefix + "post_attention_layernorm")
