"""Cohere / Command R: attention and MLP in parallel on one LayerNorm (float32, no bias), logits
times logit_scale, optional per-head LayerNorms on q and k (use_qk_norm, a weight per head),
tied embeddings by default.

Its rotary embedding rotates interleaved pairs (2i, 2i+1) where Llama rotates halves (i, i + D/2).
Both rotate the same pairs by the same angles, so q and k are loaded with each head's dimensions
reordered (even ones first, then odd ones): the usual half-split rotary (and its native kernel)
then gives the same rotated vectors, reordered alike in q and k, and q.k is unchanged."""
from __future__ import annotations

import torch
from torch import nn
from transformers import PretrainedConfig

from service.models.layers.attention import Attention
from service.models.layers.causal_lm import CausalLM
from service.models.layers.decoder import ParallelLayer
from service.models.layers.mlp import GatedMLP
from service.models.layers.norms import Float32LayerNorm
from service.models.layers.rotary import rope_cos_sin
from service.models.layers.weights import CheckpointWeights


def _halves_order(head_dim: int) -> torch.Tensor:
    """Dimension j of a reordered head is dimension order[j] of the checkpoint's head."""
    return torch.cat([torch.arange(0, head_dim, 2), torch.arange(1, head_dim, 2)])


class CohereForCausalLM(CausalLM):
    def __init__(self, config: PretrainedConfig, max_positions: int) -> None:
        super().__init__(config, max_positions)
        c, eps, hidden, d = config, config.layer_norm_eps, config.hidden_size, self.head_dim
        self.logit_scale = float(c.logit_scale)
        self.add_rope("default", *rope_cos_sin(c, d, max_positions))
        bias = bool(c.attention_bias)
        qk = c.use_qk_norm
        self.layers = nn.ModuleList(
            ParallelLayer(
                Attention(hidden, c.num_attention_heads, self.num_kv_heads, d, qkv_bias=bias, o_bias=bias,
                          q_norm=Float32LayerNorm((c.num_attention_heads, d), eps) if qk else None,
                          k_norm=Float32LayerNorm((self.num_kv_heads, d), eps) if qk else None),
                GatedMLP(hidden, c.intermediate_size, c.hidden_act), Float32LayerNorm(hidden, eps))
            for _ in range(c.num_hidden_layers))
        self.norm = Float32LayerNorm(hidden, eps)

    def load_layer(self, w: CheckpointWeights, prefix: str, layer: nn.Module) -> None:
        attn, p = layer.self_attn, prefix + "self_attn."
        order = _halves_order(self.head_dim)

        def reordered(name: str, heads: int) -> torch.Tensor | None:
            t = w.take(name)
            return None if t is None else t.reshape(heads, self.head_dim, *t.shape[1:])[:, order].reshape(t.shape)

        h, hkv = attn.num_heads, attn.num_kv_heads
        for kind in ("weight", "bias"):
            if getattr(attn.qkv_proj, kind) is None:
                continue
            parts = [reordered(f"{p}q_proj.{kind}", h), reordered(f"{p}k_proj.{kind}", hkv), w.take(f"{p}v_proj.{kind}")]
            if all(t is not None for t in parts):
                w.put(getattr(attn.qkv_proj, kind), torch.cat(parts), f"{p}qkv_proj.{kind}")
        w.put_named(attn.o_proj.weight, p + "o_proj.weight")
        if attn.o_proj.bias is not None:
            w.put_named(attn.o_proj.bias, p + "o_proj.bias")
        if attn.q_norm is not None:
            for norm, name in ((attn.q_norm, "q_norm"), (attn.k_norm, "k_norm")):
                t = w.take(f"{p}{name}.weight")
                w.put(norm.weight, None if t is None else t[:, order], f"{p}{name}.weight")
        layer.mlp.load_weights(w, prefix + "mlp.")
        w.put_norm(layer.input_layernorm, prefix + "input_layernorm")
