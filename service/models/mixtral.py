"""Mixtral: Llama's attention (every layer windowed when the config sets sliding_window) and a
sparse MoE feed-forward: top-k of a softmax router, always renormalised, float32 routing weights."""
from __future__ import annotations

from torch import nn
from transformers import PretrainedConfig

from service.models.layers.attention import Attention
from service.models.layers.causal_lm import CausalLM
from service.models.layers.decoder import PreNormLayer
from service.models.layers.moe import SparseMoE
from service.models.layers.norms import RMSNorm
from service.models.layers.rotary import rope_cos_sin
from service.models.layers.weights import CheckpointWeights
from service.models.layers.windows import window_everywhere


class MixtralForCausalLM(CausalLM):
    def __init__(self, config: PretrainedConfig, max_positions: int) -> None:
        super().__init__(config, max_positions)
        eps, hidden = config.rms_norm_eps, config.hidden_size
        self.add_rope("default", *rope_cos_sin(config, self.head_dim, max_positions))
        window = window_everywhere(config)
        self.layers = nn.ModuleList(
            PreNormLayer(
                Attention(hidden, config.num_attention_heads, self.num_kv_heads, self.head_dim, window=window),
                SparseMoE(hidden, config.intermediate_size, config.num_local_experts, config.num_experts_per_tok,
                          act=config.hidden_act, renormalize=True, float32_weights=True),
                RMSNorm(hidden, eps), RMSNorm(hidden, eps))
            for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(hidden, eps)

    def load_layer(self, w: CheckpointWeights, prefix: str, layer: nn.Module) -> None:
        layer.self_attn.load_weights(w, prefix + "self_attn.")
        # Mixtral's checkpoints name gate, up, down as w1, w3, w2 under block_sparse_moe; a GGUF
        # conversion saves transformers' in-memory names (mlp.gate, mlp.experts.gate_up_proj).
        moe = "mlp." if prefix + "mlp.experts.gate_up_proj" in w.weights else "block_sparse_moe."
        layer.mlp.load_weights(w, prefix + moe, ("w1", "w3", "w2"))
        w.put_named(layer.input_layernorm.weight, prefix + "input_layernorm.weight")
        w.put_named(layer.post_attention_layernorm.weight, prefix + "post_attention_layernorm.weight")
