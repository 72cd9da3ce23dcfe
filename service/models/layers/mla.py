"""Multi-head latent attention (DeepSeek-V2/V3) over a paged cache of compressed latents.

Each token's K and V are stored as one latent row [kv_lora_rank + rope_dim]: the RMS-normed
compressed KV c and the rotated, head-shared rope key. Attention runs in the latent space
("absorbed"): head h's key is [W_kb_h c, k_rope] and its value W_vb_h c, so

    q_h . k_h = (W_kb_h^T q_nope_h) . c + q_rope_h . k_rope     and     o_h = W_vb_h (sum_j p_j c_j),

which is multi-query attention of the queries [W_kb_h^T q_nope_h, q_rope_h] over the latent rows,
values = the same rows (the rope part of the output is dropped). The cache holds one row per
token and layer (no per-head K/V at all), and the paged attention kernels run it unchanged.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PretrainedConfig

from kernels.attention import AttentionMetadata, paged_attention
from kernels.kv_store import store_kv
from kernels.rope import StepRope, rotate_ref
from service.models.layers.norms import RMSNorm
from service.models.layers.weights import CheckpointWeights


def _interleaved_to_halves(dim: int) -> torch.Tensor:
    """Row order that turns rotary pairs (2i, 2i+1) into halves (i, i + dim/2)."""
    return torch.cat([torch.arange(0, dim, 2), torch.arange(1, dim, 2)])


class LatentAttention(nn.Module):
    """`rope_interleaved`: the checkpoint rotates interleaved pairs (DeepSeek-V2 always, V3 with
    rope_interleave); the rope rows of the q and kv projections are then reordered at load so
    the half-split rotation gives the same vectors (reordered alike in q and k)."""

    def __init__(self, config: PretrainedConfig, scale: float, rope_interleaved: bool) -> None:
        super().__init__()
        c = config
        self.num_heads = c.num_attention_heads
        self.nope, self.rope, self.rank, self.v_dim = c.qk_nope_head_dim, c.qk_rope_head_dim, c.kv_lora_rank, c.v_head_dim
        self.latent_dim = self.rank + self.rope
        self.rope_interleaved = rope_interleaved
        self.scale = scale
        eps = c.rms_norm_eps
        bias = bool(getattr(c, "attention_bias", False))
        q_out = self.num_heads * (self.nope + self.rope)
        self.q_lora = c.q_lora_rank is not None
        if self.q_lora:
            self.q_a_proj = nn.Linear(c.hidden_size, c.q_lora_rank, bias=bias)
            self.q_a_layernorm = RMSNorm(c.q_lora_rank, eps)
            self.q_b_proj = nn.Linear(c.q_lora_rank, q_out, bias=False)
        else:
            self.q_proj = nn.Linear(c.hidden_size, q_out, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(c.hidden_size, self.latent_dim, bias=bias)
        self.kv_a_layernorm = RMSNorm(self.rank, eps)
        # kv_b_proj split per head: keys' nope part [H, nope, rank], values [H, v_dim, rank].
        self.w_kb = nn.Parameter(torch.empty(self.num_heads, self.nope, self.rank))
        self.w_vb = nn.Parameter(torch.empty(self.num_heads, self.v_dim, self.rank))
        self.o_proj = nn.Linear(self.num_heads * self.v_dim, c.hidden_size, bias=bias)
        self.rope_key = "default"

    def forward(self, x: torch.Tensor, rope: StepRope, cache: torch.Tensor, same_cache: torch.Tensor,
                slot_mapping: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """`cache` is this layer's latent rows [blocks, block_size, 1, rank + rope] (the model's
        kv_planes is 1: the runner passes the one tensor as both K and V cache)."""
        t = x.shape[0]
        if self.q_lora:
            q = F.linear(self.q_a_layernorm.forward(F.linear(x, self.q_a_proj.weight, self.q_a_proj.bias)),
                         self.q_b_proj.weight)
        else:
            q = F.linear(x, self.q_proj.weight)
        q_nope, q_rope = q.view(t, self.num_heads, self.nope + self.rope).split([self.nope, self.rope], dim=-1)
        kv = F.linear(x, self.kv_a_proj_with_mqa.weight, self.kv_a_proj_with_mqa.bias)
        latent, k_rope = kv.split([self.rank, self.rope], dim=-1)
        cos, sin = rope.gathered(x.dtype)
        row = torch.cat([self.kv_a_layernorm.forward(latent), rotate_ref(k_rope, cos[:, 0], sin[:, 0])], dim=-1)
        row = row.view(t, 1, self.latent_dim)
        store_kv(row, row, cache, cache, slot_mapping)
        # Queries in latent space: [W_kb_h^T q_nope_h, rotated q_rope_h], one KV head for all.
        q_latent = torch.bmm(q_nope.transpose(0, 1), self.w_kb).transpose(0, 1)          # [T, H, rank]
        query = torch.cat([q_latent, rotate_ref(q_rope, cos, sin)], dim=-1)
        o = paged_attention(query, cache, cache, meta, self.scale)[..., :self.rank]     # [T, H, rank]
        out = torch.bmm(o.transpose(0, 1), self.w_vb.transpose(1, 2)).transpose(0, 1)   # [T, H, v_dim]
        return F.linear(out.reshape(t, self.num_heads * self.v_dim), self.o_proj.weight, self.o_proj.bias)

    def load_weights(self, w: CheckpointWeights, prefix: str) -> None:
        h, qk = self.num_heads, self.nope + self.rope

        def q_rows(param: nn.Parameter, name: str) -> None:
            t = w.take_shaped(name, tuple(param.shape))
            if t is not None and self.rope_interleaved:
                order = torch.cat([torch.arange(self.nope), self.nope + _interleaved_to_halves(self.rope)])
                t = t.reshape(h, qk, -1)[:, order].reshape(t.shape)
            w.put(param, t, name)

        if self.q_lora:
            w.put_named(self.q_a_proj.weight, prefix + "q_a_proj.weight")
            if self.q_a_proj.bias is not None:
                w.put_named(self.q_a_proj.bias, prefix + "q_a_proj.bias")
            w.put_named(self.q_a_layernorm.weight, prefix + "q_a_layernorm.weight")
            q_rows(self.q_b_proj.weight, prefix + "q_b_proj.weight")
        else:
            q_rows(self.q_proj.weight, prefix + "q_proj.weight")
        kv_order = torch.arange(self.latent_dim)
        if self.rope_interleaved:
            kv_order = torch.cat([torch.arange(self.rank), self.rank + _interleaved_to_halves(self.rope)])
        for kind in ("weight", "bias"):
            param = getattr(self.kv_a_proj_with_mqa, kind)
            if param is not None:
                name = prefix + f"kv_a_proj_with_mqa.{kind}"
                t = w.take_shaped(name, tuple(param.shape))
                w.put(param, None if t is None else t[kv_order], name)
        w.put_named(self.kv_a_layernorm.weight, prefix + "kv_a_layernorm.weight")
        kv_b = w.take_shaped(prefix + "kv_b_proj.weight", (h * (self.nope + self.v_dim), self.rank))
        if kv_b is not None:
            kv_b = kv_b.reshape(h, self.nope + self.v_dim, self.rank)
            w.put(self.w_kb, kv_b[:, :self.nope].contiguous(), prefix + "kv_b_proj.weight (keys)")
            w.put(self.w_vb, kv_b[:, self.nope:].contiguous(), prefix + "kv_b_proj.weight (values)")
        w.put_named(self.o_proj.weight, prefix + "o_proj.weight")
        if self.o_proj.bias is not None:
            w.put_named(self.o_proj.bias, prefix + "o_proj.bias")
