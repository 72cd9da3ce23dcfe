"""DeepSeek-V2 and V3: multi-head latent attention (layers/mla.py; the paged cache holds one
compressed latent row per token and layer) and a MoE with shared experts on the layers from
first_k_dense_replace on. Routing, as each transformers model does it (float32 scores):
V2 softmax, top-k greedy or group-limited (best groups by their best expert), times
routed_scaling_factor; V3 sigmoid, experts chosen with e_score_correction_bias added, groups by the
sum of their two best, weights renormalised when norm_topk_prob, times routed_scaling_factor.
Softmax scale: qk_head_dim^-0.5 times YaRN's mscale(all_dim) squared when the RoPE is scaled."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PretrainedConfig

from service.models.layers.causal_lm import CausalLM
from service.models.layers.decoder import PreNormLayer
from service.models.layers.mla import LatentAttention
from service.models.layers.mlp import GatedMLP
from service.models.layers.moe import SparseMoE
from service.models.layers.norms import RMSNorm
from service.models.layers.rotary import rope_cos_sin, rope_parameters
from service.models.layers.weights import CheckpointWeights


def _softmax_scale(config: PretrainedConfig) -> float:
    scale = (config.qk_nope_head_dim + config.qk_rope_head_dim) ** -0.5
    params = rope_parameters(config)
    if params.get("rope_type", "default") != "default" and params.get("mscale_all_dim", 0):
        factor = params["factor"]
        mscale = 1.0 if factor <= 1 else 0.1 * params["mscale_all_dim"] * math.log(factor) + 1.0
        scale = scale * mscale * mscale
    return scale


class _DeepseekMoE(SparseMoE):
    def __init__(self, config: PretrainedConfig) -> None:
        c = config
        super().__init__(c.hidden_size, c.moe_intermediate_size, c.n_routed_experts, c.num_experts_per_tok,
                         act=c.hidden_act, renormalize=False, float32_weights=True,
                         shared_inter=c.moe_intermediate_size * c.n_shared_experts)
        self.scaling = float(c.routed_scaling_factor)
        self.num_groups = c.n_group or 1
        self.topk_group = c.topk_group or 1
        self.group_size = c.n_routed_experts // self.num_groups

    def _group_mask(self, group_scores: torch.Tensor) -> torch.Tensor:
        """[T, E] True for the experts of each token's topk_group best groups ([T, groups] scores)."""
        best = torch.topk(group_scores, k=self.topk_group, dim=-1, sorted=False)[1]
        mask = torch.zeros_like(group_scores).scatter_(1, best, 1).bool()
        return mask.repeat_interleave(self.group_size, dim=-1)

    def load_weights(self, w: CheckpointWeights, prefix: str, expert_names: tuple[str, str, str] = (
            "gate_proj", "up_proj", "down_proj"), shared_name: str = "shared_experts") -> None:
        super().load_weights(w, prefix, expert_names, shared_name)


class DeepseekV2MoE(_DeepseekMoE):
    def __init__(self, config: PretrainedConfig) -> None:
        super().__init__(config)
        self.method = config.topk_method
        if self.method not in ("greedy", "group_limited_greedy"):
            raise ValueError(f"topk_method {self.method!r} is not supported")

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        scores = torch.softmax(F.linear(x.float(), self.gate.weight.float()), dim=-1, dtype=torch.float32)
        if self.method == "group_limited_greedy":
            group_scores = scores.view(len(scores), self.num_groups, self.group_size).max(dim=-1).values
            scores = scores.masked_fill(~self._group_mask(group_scores), 0.0)
        weights, experts = torch.topk(scores, k=self.top_k, dim=-1, sorted=False)
        return experts, weights * self.scaling


class DeepseekV3MoE(_DeepseekMoE):
    def __init__(self, config: PretrainedConfig) -> None:
        super().__init__(config)
        self.norm_topk_prob = bool(config.norm_topk_prob)
        self.e_score_correction_bias = nn.Parameter(torch.zeros(config.n_routed_experts))

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        scores = torch.sigmoid(F.linear(x.float(), self.gate.weight.float()))
        choice = scores + self.e_score_correction_bias.float()
        group_scores = choice.view(len(choice), self.num_groups, self.group_size).topk(2, dim=-1)[0].sum(dim=-1)
        choice = choice.masked_fill(~self._group_mask(group_scores), float("-inf"))
        experts = torch.topk(choice, k=self.top_k, dim=-1, sorted=False)[1]
        weights = scores.gather(1, experts)
        if self.norm_topk_prob:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        return experts, weights * self.scaling

    def load_weights(self, w: CheckpointWeights, prefix: str, expert_names: tuple[str, str, str] = (
            "gate_proj", "up_proj", "down_proj"), shared_name: str = "shared_experts") -> None:
        super().load_weights(w, prefix, expert_names, shared_name)
        w.put_named(self.e_score_correction_bias, prefix + "gate.e_score_correction_bias")


class _Deepseek(CausalLM):
    kv_planes = 1   # K and V are one latent row per token
    moe_class: type[_DeepseekMoE]

    @staticmethod
    def rope_interleaved(config: PretrainedConfig) -> bool:
        return True    # V2 rotates interleaved pairs (as complex numbers)

    def __init__(self, config: PretrainedConfig, max_positions: int) -> None:
        super().__init__(config, max_positions)
        c, eps, hidden = config, config.rms_norm_eps, config.hidden_size
        # The cache layout: one "KV head" of kv_lora_rank + rope dims.
        self.num_kv_heads = 1
        self.head_dim = c.kv_lora_rank + c.qk_rope_head_dim
        self.add_rope("default", *rope_cos_sin(c, c.qk_rope_head_dim, max_positions))
        scale = _softmax_scale(c)
        mlp_bias = bool(getattr(c, "mlp_bias", False))
        self.layers = nn.ModuleList(
            PreNormLayer(
                LatentAttention(c, scale, self.rope_interleaved(c)),
                self.moe_class(c) if i >= c.first_k_dense_replace
                else GatedMLP(hidden, c.intermediate_size, c.hidden_act, bias=mlp_bias),
                RMSNorm(hidden, eps), RMSNorm(hidden, eps))
            for i in range(c.num_hidden_layers))
        self.norm = RMSNorm(hidden, eps)

    def ignored_prefixes(self) -> tuple[str, ...]:
        # Multi-token-prediction layers follow the decoder layers in V3 checkpoints; transformers
        # does not run them either.
        n, extra = self.config.num_hidden_layers, getattr(self.config, "num_nextn_predict_layers", 0) or 0
        return tuple(f"model.layers.{i}." for i in range(n, n + extra))

    def load_layer(self, w: CheckpointWeights, prefix: str, layer: nn.Module) -> None:
        layer.self_attn.load_weights(w, prefix + "self_attn.")
        layer.mlp.load_weights(w, prefix + "mlp.")
        w.put_norm(layer.input_layernorm, prefix + "input_layernorm")
        w.put_norm(layer.post_attention_layernorm, prefix + "post_attention_layernorm")


class DeepseekV2ForCausalLM(_Deepseek):
    moe_class = DeepseekV2MoE


class DeepseekV3ForCausalLM(_Deepseek):
    moe_class = DeepseekV3MoE

    @staticmethod
    def rope_interleaved(config: PretrainedConfig) -> bool:
        return bool(getattr(config, "rope_interleave", True))
