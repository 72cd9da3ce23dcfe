"""Qwen2-MoE and Qwen3-MoE: the dense Qwen2 / Qwen3 attention with a sparse MoE feed-forward on
the layers the config makes sparse (decoder_sparse_step, mlp_only_layers; the rest keep a dense
MLP). Qwen2-MoE adds a shared expert behind a sigmoid gate; norm_topk_prob decides whether the
top-k routing weights are renormalised."""
from __future__ import annotations

from torch import nn
from transformers import PretrainedConfig

from service.models.layers.attention import Attention
from service.models.layers.causal_lm import CausalLM
from service.models.layers.decoder import PreNormLayer
from service.models.layers.mlp import GatedMLP
from service.models.layers.moe import SparseMoE
from service.models.layers.norms import RMSNorm
from service.models.layers.rotary import rope_cos_sin
from service.models.layers.weights import CheckpointWeights
from service.models.layers.windows import window_everywhere, windows_by_layer_type
from service.models.qwen3 import qk_norm_attention


def _is_sparse(config: PretrainedConfig, i: int) -> bool:
    return (i not in (getattr(config, "mlp_only_layers", None) or []) and config.num_experts > 0
            and (i + 1) % config.decoder_sparse_step == 0)


def _feed_forward(config: PretrainedConfig, i: int, shared: bool) -> nn.Module:
    if not _is_sparse(config, i):
        return GatedMLP(config.hidden_size, config.intermediate_size, config.hidden_act)
    return SparseMoE(config.hidden_size, config.moe_intermediate_size, config.num_experts, config.num_experts_per_tok,
                     act=config.hidden_act, renormalize=bool(config.norm_topk_prob),
                     shared_inter=config.shared_expert_intermediate_size if shared else None, shared_gate=shared)


class _QwenMoE(CausalLM):
    def load_layer(self, w: CheckpointWeights, prefix: str, layer: nn.Module) -> None:
        layer.self_attn.load_weights(w, prefix + "self_attn.")
        layer.mlp.load_weights(w, prefix + "mlp.")
        w.put_named(layer.input_layernorm.weight, prefix + "input_layernorm.weight")
        w.put_named(layer.post_attention_layernorm.weight, prefix + "post_attention_layernorm.weight")


class Qwen2MoeForCausalLM(_QwenMoE):
    def __init__(self, config: PretrainedConfig, max_positions: int) -> None:
        super().__init__(config, max_positions)
        eps, hidden = config.rms_norm_eps, config.hidden_size
        self.add_rope("default", *rope_cos_sin(config, self.head_dim, max_positions))
        self.layers = nn.ModuleList(
            PreNormLayer(
                Attention(hidden, config.num_attention_heads, self.num_kv_heads, self.head_dim,
                          qkv_bias=bool(config.qkv_bias), window=window),
                _feed_forward(config, i, shared=True), RMSNorm(hidden, eps), RMSNorm(hidden, eps))
            for i, window in enumerate(windows_by_layer_type(config)))
        self.norm = RMSNorm(hidden, eps)


class Qwen3MoeForCausalLM(_QwenMoE):
    def __init__(self, config: PretrainedConfig, max_positions: int) -> None:
        super().__init__(config, max_positions)
        eps, hidden = config.rms_norm_eps, config.hidden_size
        self.add_rope("default", *rope_cos_sin(config, self.head_dim, max_positions))
        window = window_everywhere(config)
        self.layers = nn.ModuleList(
            PreNormLayer(qk_norm_attention(config, self.head_dim, window), _feed_forward(config, i, shared=False),
                         RMSNorm(hidden, eps), RMSNorm(hidden, eps))
            for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(hidden, eps)
