"""Write the new tokens' K and V into the paged cache."""
from __future__ import annotations

import torch
from common import env


def store_kv(
    key: torch.Tensor,          # [T, Hkv, D]
    value: torch.Tensor,        # [T, Hkv, D]
    k_cache: torch.Tensor,      # [num_blocks, block_size, Hkv, D]
    v_cache: torch.Tensor,      # [num_blocks, block_size, Hkv, D]
    slot_mapping: torch.Tensor,  # [T] int64: block_id * block_size + offset
) -> None:
    if k_cache.is_cuda or env.force_triton():
        from kernels.triton_kv_store import store_kv_triton

        store_kv_triton(key, value, k_cache, v_cache, slot_mapping)
        return
    store_kv_ref(key, value, k_cache, v_cache, slot_mapping)


def store_kv_ref(
    key: torch.Tensor,
    value: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    num_slots = k_cache.shape[0] * k_cache.shape[1]
    # A flat view makes every slot one row, so the store is a single index_copy_.
    k_cache.view(num_slots, *k_cache.shape[2:]).index_copy_(0, slot_mapping, key.to(k_cache.dtype))
    v_cache.view(num_slots, *v_cache.shape[2:]).index_copy_(0, slot_mapping, value.to(v_cache.dtype))
