"""The per-step description of a flattened batch that every paged-attention implementation reads.

It lives apart from `kernels.attention` (the dispatcher and the torch/C paths) so that the
Triton implementation can take it without importing the dispatcher that imports it.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(slots=True)
class NativePlan:
    """Which rows the native CPU kernel takes, built once per step (`kernels.attention.native_plan`)."""
    query_start_loc: torch.Tensor   # [B+1] int64
    rows: torch.Tensor              # int64 rows for the C kernel
    num_rows: int
    long_rows: list[int]            # rows left to the torch path


@dataclass(slots=True)
class AttentionMetadata:
    """How the flattened batch maps onto sequences and cache blocks.

    Rows are ordered decodes first: rows [0, num_decodes) have exactly one query token,
    which lets the reference handle all of them in one batched matmul.
    """
    query_start_loc: list[int]    # [B+1] offsets of each row's queries in the flat batch
    seq_lens: list[int]           # [B] KV length of each row after this step (context + new)
    block_tables: torch.Tensor    # [B, max_blocks] int64 block ids (padded with 0)
    seq_lens_t: torch.Tensor      # [B] int64, seq_lens as a tensor on the cache's device
    num_decodes: int              # leading rows with a single query
    block_size: int
    # Built once per step by the native CPU path and reused by every layer (see native_plan).
    cached_plan: NativePlan | None = None
