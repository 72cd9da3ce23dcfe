"""Phi-3 / Phi-4 (text): Llama's layer with q/k/v and gate/up already fused in the checkpoint,
LongRoPE ("su") scaling (layers/rotary.py says how a position's rotation is chosen), partial
rotary (Phi-4-mini rotates 3/4 of each head), every layer windowed when sliding_window is set."""
from __future__ import annotations

from torch import nn
from transformers import PretrainedConfig

from service.models.layers.attention import Attention
from service.models.layers.causal_lm import CausalLM
from service.models.layers.decoder import PreNormLayer
from service.models.layers.mlp import GatedMLP
from service.models.layers.norms import RMSNorm
from service.models.layers.rotary import rope_cos_sin, rope_parameters
from service.models.layers.weights import CheckpointWeights
from service.models.layers.windows import window_everywhere


class Phi3ForCausalLM(CausalLM):
    def __init__(self, config: PretrainedConfig, max_positions: int) -> None:
        super().__init__(config, max_positions)
        c, eps, hidden = config, config.rms_norm_eps, config.hidden_size
        self.add_rope("default", *rope_cos_sin(c, self.head_dim, max_positions))
        rotary_dim = int(self.head_dim * rope_parameters(c).get("partial_rotary_factor", 1.0))
        window = window_everywhere(c)
        self.layers = nn.ModuleList(
            PreNormLayer(
                Attention(hidden, c.num_attention_heads, self.num_kv_heads, self.head_dim, window=window,
                          rotary_dim=rotary_dim),
                GatedMLP(hidden, c.intermediate_size, c.hidden_act), RMSNorm(hidden, eps), RMSNorm(hidden, eps))
            for _ in range(c.num_hidden_layers))
        self.norm = RMSNorm(hidden, eps)

    def load_layer(self, w: CheckpointWeights, prefix: str, layer: nn.Module) -> None:
        attn, mlp = layer.self_attn, layer.mlp
        w.put_named(attn.qkv_proj.weight, prefix + "self_attn.qkv_proj.weight")   # rows q, k, v as ours
        w.put_named(attn.o_proj.weight, prefix + "self_attn.o_proj.weight")
        w.put_named(mlp.gate_up_proj.weight, prefix + "mlp.gate_up_proj.weight")   # rows gate, up as ours
        w.put_named(mlp.down_proj.weight, prefix + "mlp.down_proj.weight")
        w.put_norm(layer.input_layernorm, prefix + "input_layernorm")
        w.put_norm(layer.post_attention_layernorm, prefix + "post_attention_layernorm")
