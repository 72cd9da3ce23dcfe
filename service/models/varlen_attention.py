"""Bidirectional attention over a padding-free batch: one flat list of tokens from many sequences,
each token attending to every token of its own sequence and to nothing else (encoders: no KV
cache, no causal mask).

One `scaled_dot_product_attention` call per sequence on views of the flat Q/K/V: no padding is
built and no mask is needed, so the work is exactly sum(L_i^2), not B * max(L)^2. The loop costs a
few microseconds per sequence and layer, which is noise next to the projections of even a short
sequence; a batch of equal lengths takes a single call.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F


def varlen_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: Sequence[int],
                     scale: float) -> torch.Tensor:
    """q, k, v: [T, heads, head_dim]; cu_seqlens: [0, L_0, L_0 + L_1, ..., T]. Returns [T, heads, head_dim]."""
    t, heads, dim = q.shape
    lengths = [b - a for a, b in zip(cu_seqlens[:-1], cu_seqlens[1:])]
    if len(set(lengths)) == 1:
        # Equal lengths (a single sequence included): one batched call, [B, heads, L, dim] views.
        b, n = len(lengths), lengths[0]
        def split(x: torch.Tensor) -> torch.Tensor:
            return x.view(b, n, heads, dim).transpose(1, 2)
        o = F.scaled_dot_product_attention(split(q), split(k), split(v), scale=scale)
        return o.transpose(1, 2).reshape(t, heads, dim)
    out = torch.empty_like(q)
    for a, e in zip(cu_seqlens[:-1], cu_seqlens[1:]):
        o = F.scaled_dot_product_attention(q[a:e].transpose(0, 1), k[a:e].transpose(0, 1), v[a:e].transpose(0, 1),
                                           scale=scale)
        out[a:e] = o.transpose(0, 1)
    return out
