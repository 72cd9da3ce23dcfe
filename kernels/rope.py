"""Rotary embedding of q and k from the fused qkv projection, and the paged-cache store of k, v."""
from __future__ import annotations

import torch

from kernels import cpu_native
from kernels.kv_store import store_kv


class StepRope:
    """One step's rotary inputs: the model's cos/sin tables [max_pos, D] and the tokens'
    positions [T]. The torch path gathers each token's row once per step, not once per layer."""

    __slots__ = ("cos_table", "sin_table", "positions", "_gathered")

    def __init__(self, cos_table: torch.Tensor, sin_table: torch.Tensor, positions: torch.Tensor) -> None:
        self.cos_table, self.sin_table, self.positions = cos_table, sin_table, positions
        self._gathered: tuple[torch.Tensor, torch.Tensor] | None = None

    def gathered(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [T, 1, D] in dtype, broadcasting over heads."""
        if self._gathered is None or self._gathered[0].dtype != dtype:
            self._gathered = (self.cos_table[self.positions].to(dtype).unsqueeze(1),
                              self.sin_table[self.positions].to(dtype).unsqueeze(1))
        return self._gathered


def rotate_ref(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x * cos + rotate_half(x) * sin, as transformers computes it."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


def rope_store(
    qkv: torch.Tensor,            # [T, (H + 2 * Hkv) * D]: q, k, v of each token
    rope: StepRope,
    k_cache: torch.Tensor,        # [num_blocks, block_size, Hkv, D]
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,   # [T] int64
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
) -> torch.Tensor:                # q rotated, [T, H, D]
    if (cpu_native.usable(qkv, rope.cos_table) and cpu_native.kv_usable(k_cache, v_cache) and qkv.stride(-1) == 1
            and k_cache.is_contiguous() and v_cache.is_contiguous()):
        return rope_store_native(qkv, rope, k_cache, v_cache, slot_mapping, num_heads, num_kv_heads, head_dim)
    return rope_store_ref(qkv, rope, k_cache, v_cache, slot_mapping, num_heads, num_kv_heads, head_dim)


def rope_store_ref(qkv: torch.Tensor, rope: StepRope, k_cache: torch.Tensor, v_cache: torch.Tensor,
                   slot_mapping: torch.Tensor, num_heads: int, num_kv_heads: int, head_dim: int) -> torch.Tensor:
    t = qkv.shape[0]
    q_size, kv_size = num_heads * head_dim, num_kv_heads * head_dim
    q, k, v = qkv.split([q_size, kv_size, kv_size], dim=-1)
    cos, sin = rope.gathered(qkv.dtype)
    q = rotate_ref(q.view(t, num_heads, head_dim), cos, sin)
    k = rotate_ref(k.view(t, num_kv_heads, head_dim), cos, sin)
    store_kv(k, v.view(t, num_kv_heads, head_dim), k_cache, v_cache, slot_mapping)
    return q


def rope_store_native(qkv: torch.Tensor, rope: StepRope, k_cache: torch.Tensor, v_cache: torch.Tensor,
                      slot_mapping: torch.Tensor, num_heads: int, num_kv_heads: int, head_dim: int) -> torch.Tensor:
    """float32 CPU (caches float32 or bf16), bit-identical to rope_store_ref."""
    t = qkv.shape[0]
    q = torch.empty((t, num_heads, head_dim), dtype=qkv.dtype)
    positions, slots = rope.positions.contiguous(), slot_mapping.contiguous()
    cpu_native.lib().weft_rope_store_f32(
        qkv.data_ptr(), qkv.stride(0), q.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(),
        rope.cos_table.data_ptr(), rope.sin_table.data_ptr(), positions.data_ptr(), slots.data_ptr(),
        t, num_heads, num_kv_heads, head_dim, cpu_native.kv_bf16(k_cache), torch.get_num_threads(),
    )
    return q
