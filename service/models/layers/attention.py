"""Self-attention over the paged KV cache: fused q/k/v projection, optional q/k norms, rotary
embedding and cache store (one native call on CPU), paged attention (with the layer's sliding
window and soft-cap, if any), output projection."""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from kernels.attention import AttentionMetadata, paged_attention
from kernels.kv_store import store_kv
from kernels.rope import StepRope, rope_store, rotate_ref
from service.models.layers.linear import AMX_MIN_ROWS, project
from service.models.layers.weights import CheckpointWeights
from service.models.lora import LoRAStep


class Attention(nn.Module):
    """q/k/v are one [(H + 2 * Hkv) * D, hidden] projection: one GEMM instead of three.

    `q_norm` / `k_norm` (Qwen3, Gemma 3, Cohere, OLMo 2) normalise q and k before the rotary
    embedding, each head on its own (`qk_norm_per_head`) or all heads together (OLMo 2).
    `rope_key` names the rotary table the layer reads (families with several: Gemma 3);
    `rotary_dim` < head_dim rotates only the first dimensions of each head (partial rotary)."""

    def __init__(
        self, hidden: int, num_heads: int, num_kv_heads: int, head_dim: int, *,
        qkv_bias: bool = False, o_bias: bool = False, scale: float | None = None,
        window: int | None = None, softcap: float | None = None,
        q_norm: nn.Module | None = None, k_norm: nn.Module | None = None, qk_norm_per_head: bool = True,
        rope_key: str = "default", rotary_dim: int | None = None,
    ) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.q_size = num_heads * head_dim
        self.kv_size = num_kv_heads * head_dim
        self.qkv_proj = nn.Linear(hidden, self.q_size + 2 * self.kv_size, bias=qkv_bias)
        self.o_proj = nn.Linear(self.q_size, hidden, bias=o_bias)
        self.scale = head_dim ** -0.5 if scale is None else scale
        self.window = window
        self.softcap = softcap
        self.q_norm = q_norm
        self.k_norm = k_norm
        self.qk_norm_per_head = qk_norm_per_head
        self.rope_key = rope_key
        self.rotary_dim = head_dim if rotary_dim is None else rotary_dim
        # Tensor parallel: sums the partial o_proj outputs of the ranks (service/models/parallel.py).
        self.reduce: Callable[[torch.Tensor], None] | None = None

    def forward(
        self, x: torch.Tensor, rope: StepRope,
        k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor, meta: AttentionMetadata,
        lora: LoRAStep | None = None, layer: int = 0, tile_rows: int = AMX_MIN_ROWS,
    ) -> torch.Tensor:
        """`tile_rows`: the step's rows from which bf16 mode multiplies on AMX tiles (layers/linear.py,
        amx_min_rows)."""
        t = x.shape[0]
        qkv = project(x, self.qkv_proj, tile_rows)
        if lora is not None:
            lora.add_(qkv, x, layer, "qkv")
        if self.q_norm is not None:
            qkv = self._norm_qk(qkv)
        if self.rotary_dim == self.head_dim:
            q = rope_store(qkv, rope, k_cache, v_cache, slot_mapping, self.num_heads, self.num_kv_heads, self.head_dim)
        else:
            q = self._partial_rope_store(qkv, rope, k_cache, v_cache, slot_mapping)
        o = paged_attention(q, k_cache, v_cache, meta, self.scale, self.window, self.softcap).reshape(t, self.q_size)
        out = project(o, self.o_proj, tile_rows)
        if lora is not None:
            lora.add_(out, o, layer, "o")
        if self.reduce is not None:
            self.reduce(out)
        return out

    def _norm_qk(self, qkv: torch.Tensor) -> torch.Tensor:
        t = qkv.shape[0]
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        if self.qk_norm_per_head:
            q = self.q_norm.forward(q.reshape(t, self.num_heads, self.head_dim)).reshape(t, self.q_size)
            k = self.k_norm.forward(k.reshape(t, self.num_kv_heads, self.head_dim)).reshape(t, self.kv_size)
        else:
            q = self.q_norm.forward(q)
            k = self.k_norm.forward(k)
        return torch.cat([q, k, v], dim=-1)

    def _partial_rope_store(self, qkv: torch.Tensor, rope: StepRope, k_cache: torch.Tensor, v_cache: torch.Tensor,
                            slot_mapping: torch.Tensor) -> torch.Tensor:
        """Rotate the first rotary_dim dimensions of each q/k head, pass the rest; store k, v."""
        t, rd = qkv.shape[0], self.rotary_dim
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.reshape(t, self.num_heads, self.head_dim)
        k = k.reshape(t, self.num_kv_heads, self.head_dim)
        cos, sin = rope.gathered(qkv.dtype)
        q = torch.cat([rotate_ref(q[..., :rd], cos, sin), q[..., rd:]], dim=-1)
        k = torch.cat([rotate_ref(k[..., :rd], cos, sin), k[..., rd:]], dim=-1)
        store_kv(k, v.reshape(t, self.num_kv_heads, self.head_dim), k_cache, v_cache, slot_mapping)
        return q

    def load_weights(self, w: CheckpointWeights, prefix: str) -> None:
        """From separate q/k/v/o projections (and norms) named prefix + q_proj.weight etc."""
        w.put(self.qkv_proj.weight, w.cat([prefix + f"{n}_proj.weight" for n in "qkv"]), prefix + "qkv_proj.weight")
        if self.qkv_proj.bias is not None:
            w.put(self.qkv_proj.bias, w.cat([prefix + f"{n}_proj.bias" for n in "qkv"]), prefix + "qkv_proj.bias")
        w.put_named(self.o_proj.weight, prefix + "o_proj.weight")
        if self.o_proj.bias is not None:
            w.put_named(self.o_proj.bias, prefix + "o_proj.bias")
        if self.q_norm is not None:
            w.put_named(self.q_norm.weight, prefix + "q_norm.weight")
            w.put_named(self.k_norm.weight, prefix + "k_norm.weight")
