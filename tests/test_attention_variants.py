"""Sliding-window and soft-capped paged attention (the torch reference and the CPU dispatcher)
against a dense per-query formulation written the way transformers' eager attention reads."""
from __future__ import annotations

import math

import pytest
import torch

from kernels.attention import paged_attention, paged_attention_ref
from tests.test_kernels import _poison_outside_window, make_attention_batch


def _dense(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta, scale: float,
           window: int | None, softcap: float | None) -> torch.Tensor:
    """One query at a time over its row's keys gathered token by token."""
    out = torch.zeros_like(q)
    bs = meta.block_size
    group = q.shape[1] // k_cache.shape[2]
    for row, seq_len in enumerate(meta.seq_lens):
        start, end = meta.query_start_loc[row], meta.query_start_loc[row + 1]
        for i, t in enumerate(range(start, end)):
            pos = seq_len - (end - start) + i
            lo = 0 if window is None else max(0, pos - window + 1)
            keys = range(lo, pos + 1)
            k = torch.stack([k_cache[meta.block_tables[row, n // bs], n % bs] for n in keys])   # [L, Hkv, D]
            v = torch.stack([v_cache[meta.block_tables[row, n // bs], n % bs] for n in keys])
            k = k.repeat_interleave(group, dim=1).transpose(0, 1)                               # [H, L, D]
            v = v.repeat_interleave(group, dim=1).transpose(0, 1)
            s = torch.einsum("hd,hld->hl", q[t], k) * scale
            if softcap is not None:
                s = torch.tanh(s / softcap) * softcap
            out[t] = torch.einsum("hl,hld->hd", torch.softmax(s, dim=-1), v)
    return out


@pytest.mark.parametrize("window,softcap,block_size", [
    (None, 7.0, 16), (13, None, 16), (13, None, 8), (40, 5.0, 16), (1, None, 16), (16, None, 16),
])
def test_reference_matches_dense(window: int | None, softcap: float | None, block_size: int) -> None:
    torch.manual_seed(0)
    dec = [1, 9, 16, 17, 33, 70]
    pre = [(0, 19), (5, 12), (31, 9), (50, 1 + 2)]
    q, k_cache, v_cache, meta = make_attention_batch(dec, pre, 6, 2, 16, block_size, torch.float64, "cpu")
    q = q * 3
    scale = 16 ** -0.5
    if window is not None:
        _poison_outside_window(k_cache, v_cache, meta, window)
    want = _dense(q, k_cache, v_cache, meta, scale, window, softcap)
    got = paged_attention_ref(q, k_cache, v_cache, meta, scale, window, softcap)
    assert not torch.isnan(got).any(), "a block before the window was read"
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)   # decode scores are float32


def test_dispatch_float32_window_and_cap() -> None:
    """The float32 CPU dispatcher (native kernel where it applies) equals the reference."""
    torch.manual_seed(1)
    q, k_cache, v_cache, meta = make_attention_batch([5, 40], [(30, 20)], 4, 2, 32, 16, torch.float32, "cpu")
    scale = 1 / math.sqrt(32)
    for window, softcap in [(None, None), (24, None), (None, 3.0), (24, 3.0), (10_000, None)]:
        got = paged_attention(q, k_cache, v_cache, meta, scale, window=window, softcap=softcap)
        want = paged_attention_ref(q.double(), k_cache.double(), v_cache.double(), meta, scale, window, softcap)
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
