"""Paged attention over a flattened batch: decode rows (one query) and prefill chunks
(several queries whose earlier context is already in the cache) in one call.

The dispatcher: Triton on CUDA (`kernels.triton_attention`, imported only then, so CPU-only
installs need no triton), the native C kernel for float32 on CPU, else the torch reference.
The batch description, `AttentionMetadata`, lives in `kernels.attention_metadata`.

Two per-layer options, both as `transformers` computes them:
- `window` (sliding-window attention): a query at position p sees keys at positions
  p - window < n <= p. Cache blocks wholly before the window are never read.
- `softcap` (attention-logit soft-capping): scores s = scale * q.k become softcap * tanh(s / softcap)
  before the causal mask and the softmax.
"""
from __future__ import annotations

import torch

from kernels import cpu_native
from kernels.attention_metadata import AttentionMetadata, NativePlan
from common import env


def paged_attention(
    q: torch.Tensor,           # [T, H, D]
    k_cache: torch.Tensor,     # [num_blocks, block_size, Hkv, D]
    v_cache: torch.Tensor,     # [num_blocks, block_size, Hkv, D]
    meta: AttentionMetadata,
    scale: float,
    window: int | None = None,
    softcap: float | None = None,
) -> torch.Tensor:             # [T, H, D]
    if window is not None and max(meta.seq_lens) <= window:
        window = None          # every row lies inside its window: plain causal attention
    if q.is_cuda or env.force_triton():
        from kernels.triton_attention import paged_attention_triton

        return paged_attention_triton(q, k_cache, v_cache, meta, scale, window=window, softcap=softcap)
    if window is None and softcap is None and cpu_native.usable(q) and cpu_native.kv_usable(k_cache, v_cache):
        return paged_attention_native(q, k_cache, v_cache, meta, scale)
    return paged_attention_ref(q, k_cache, v_cache, meta, scale, window, softcap)


# Rows with at most this many queries go to the C kernel (decodes, speculative verification,
# short chunks); longer prefill chunks to torch's SDPA, whose blocked matmuls win there.
NATIVE_MAX_QUERIES = 16


def native_plan(meta: AttentionMetadata) -> NativePlan:
    if meta.cached_plan is None:
        qsl = meta.query_start_loc
        rows, long_rows = [], []
        for r in range(len(meta.seq_lens)):
            (rows if qsl[r + 1] - qsl[r] <= NATIVE_MAX_QUERIES else long_rows).append(r)
        meta.cached_plan = NativePlan(torch.tensor(qsl, dtype=torch.long), torch.tensor(rows, dtype=torch.long),
                                      len(rows), long_rows)
    return meta.cached_plan


def paged_attention_native(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
) -> torch.Tensor:
    """float32 queries on CPU: short rows in the C kernel (reads the blocks in place, float32 or
    bf16), long ones in SDPA."""
    plan = native_plan(meta)
    q = q.contiguous()
    out = torch.empty_like(q)
    if plan.num_rows:
        tables, seq_lens = meta.block_tables.contiguous(), meta.seq_lens_t.contiguous()
        k_cache, v_cache = k_cache.contiguous(), v_cache.contiguous()
        rc = cpu_native.lib().weft_paged_attention_f32(
            q.data_ptr(), out.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(),
            tables.data_ptr(), tables.shape[1], seq_lens.data_ptr(), plan.query_start_loc.data_ptr(),
            plan.rows.data_ptr(), plan.num_rows, q.shape[1], k_cache.shape[2], q.shape[2],
            meta.block_size, scale, cpu_native.kv_bf16(k_cache), torch.get_num_threads(),
        )
        if rc != 0:
            raise MemoryError("paged attention: could not allocate scratch memory")
    for row in plan.long_rows:
        start, end = meta.query_start_loc[row], meta.query_start_loc[row + 1]
        out[start:end] = _prefill_row(q[start:end], k_cache, v_cache, meta, row, scale, split=True)
    return out


def paged_attention_ref(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
    window: int | None = None,
    softcap: float | None = None,
) -> torch.Tensor:
    out = torch.empty_like(q)
    nd = meta.num_decodes
    if nd:
        out[:nd] = _decode_rows(q[:nd], k_cache, v_cache, meta, scale, window, softcap)
    for row in range(nd, len(meta.seq_lens)):
        start, end = meta.query_start_loc[row], meta.query_start_loc[row + 1]
        out[start:end] = _prefill_row(q[start:end], k_cache, v_cache, meta, row, scale, window, softcap)
    return out


def _gather(cache: torch.Tensor, block_ids: torch.Tensor) -> torch.Tensor:
    """Blocks [..., nb] -> contiguous tokens [..., nb * block_size, Hkv, D]."""
    g = cache[block_ids]
    return g.reshape(*block_ids.shape[:-1], -1, *cache.shape[2:])


def _soft_cap(scores: torch.Tensor, softcap: float | None) -> torch.Tensor:
    """softcap * tanh(scores / softcap), in transformers' order of operations."""
    if softcap is None:
        return scores
    return torch.tanh(scores / softcap) * softcap


def _decode_rows(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata, scale: float,
    window: int | None = None, softcap: float | None = None,
) -> torch.Tensor:
    nd, num_heads, head_dim = q.shape
    num_kv_heads = k_cache.shape[2]
    group = num_heads // num_kv_heads
    bs = meta.block_size
    lens = meta.seq_lens[:nd]
    seq_lens_t = meta.seq_lens_t[:nd]
    if window is None:
        nb = -(-max(lens) // bs)
        tables = meta.block_tables[:nd, :nb]
        first_block = None
    else:
        # Each row reads from the block holding its first visible key (position seq_len - window).
        nb = max(-(-n // bs) - max(0, n - window) // bs for n in lens)
        first_block = (seq_lens_t - window).clamp_min(0) // bs                      # [nd]
        cols = (first_block[:, None] + torch.arange(nb, device=q.device)[None, :])
        tables = meta.block_tables[:nd].gather(1, cols.clamp_max(meta.block_tables.shape[1] - 1))
    k = _gather(k_cache, tables).to(q.dtype)   # [nd, L, Hkv, D]
    v = _gather(v_cache, tables).to(q.dtype)
    # Grouped queries share their KV head: [nd, Hkv, G, D] x [nd, Hkv, D, L] without repeating K.
    qg = q.view(nd, num_kv_heads, group, head_dim)
    scores = _soft_cap(torch.matmul(qg, k.permute(0, 2, 3, 1)).float() * scale, softcap)   # [nd, Hkv, G, L]
    key_pos = torch.arange(k.shape[1], device=q.device)[None, :]
    if first_block is not None:
        key_pos = key_pos + (first_block * bs)[:, None]
    valid = key_pos < seq_lens_t[:, None]
    if window is not None:
        valid &= key_pos >= (seq_lens_t - window)[:, None]
    scores.masked_fill_(~valid[:, None, None, :], float("-inf"))
    probs = torch.softmax(scores, dim=-1).to(q.dtype)
    o = torch.matmul(probs, v.permute(0, 2, 1, 3))                              # [nd, Hkv, G, D]
    return o.reshape(nd, num_heads, head_dim)


def _flash_with_lse():
    """torch's fused CPU flash attention returning its log-sum-exp too (the op SDPA calls on
    CPU), or None where this torch has none."""
    try:
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    except (AttributeError, RuntimeError):
        return None


_FLASH_LSE = _flash_with_lse()


def _context_then_chunk(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, context: int, scale: float) -> torch.Tensor:
    """Attention of a chunk's queries q [1, H, Q, D] after `context` cached keys (k, v [1, H,
    context + Q, D]): every query sees all the context (no mask) and its own chunk causally
    (is_causal's top-left alignment is right for the chunk alone), two calls of the fused
    kernel joined by their log-sum-exps. One call with a mask computes every masked score and
    reads the mask: on 2 cores, 976 queries after 1,024 keys (9 heads x 64) took 34 ms a layer
    that way, 26 ms this way. Equal within float32 rounding."""
    o1, lse1 = _FLASH_LSE(q, k[:, :, :context], v[:, :, :context], scale=scale)
    o2, lse2 = _FLASH_LSE(q, k[:, :, context:], v[:, :, context:], is_causal=True, scale=scale)
    top = torch.maximum(lse1, lse2)
    w1, w2 = torch.exp(lse1 - top), torch.exp(lse2 - top)
    total = w1 + w2
    return o1 * (w1 / total).unsqueeze(-1).to(o1.dtype) + o2 * (w2 / total).unsqueeze(-1).to(o2.dtype)


def _prefill_row(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata, row: int, scale: float,
    window: int | None = None, softcap: float | None = None, split: bool = False,
) -> torch.Tensor:
    """One long row's queries [Q, H, D]. `split`: a row after cached context runs as two fused
    calls (`_context_then_chunk`) instead of one masked call; the reference keeps the mask."""
    num_q, num_heads, head_dim = q.shape
    seq_len = meta.seq_lens[row]
    context = seq_len - num_q
    # Keys from the block holding the first query's first visible key (all of them without a window).
    first_block = 0 if window is None else max(0, context - window + 1) // meta.block_size
    start = first_block * meta.block_size
    nb = -(-seq_len // meta.block_size)
    k = _gather(k_cache, meta.block_tables[row, first_block:nb])[:seq_len - start].to(q.dtype)   # [L, Hkv, D]
    v = _gather(v_cache, meta.block_tables[row, first_block:nb])[:seq_len - start].to(q.dtype)
    group = num_heads // k.shape[1]
    k, v = k.transpose(0, 1), v.transpose(0, 1)                                # [Hkv, L, D]
    if softcap is None and context == 0 and window is None:
        # Plain causal attention from position 0. 4-D operands: torch's CPU SDPA takes its fused
        # flash kernel only for [B, H, Q, D] (3-D ones fall back to the math backend, ~3x slower
        # on a 2,000-token prompt), and is_causal lets it skip the masked half (another ~2x).
        # torch's is_causal is top-left aligned, hence only for rows starting at position 0.
        # enable_gqa: the group's heads read one K/V head instead of a repeated copy (bit-identical;
        # ~25% of a 100-token row's call on 2 cores).
        o = torch.nn.functional.scaled_dot_product_attention(
            q.transpose(0, 1)[None], k[None], v[None], is_causal=True, scale=scale, enable_gqa=group > 1)
        return o[0].transpose(0, 1)                                             # [Q, H, D]
    k = k.repeat_interleave(group, dim=0)                                      # [H, L, D]
    v = v.repeat_interleave(group, dim=0)
    if split and softcap is None and window is None and _FLASH_LSE is not None and q.device.type == "cpu":
        return _context_then_chunk(q.transpose(0, 1)[None], k[None], v[None], context, scale)[0].transpose(0, 1)
    # Query i sits at position context + i and sees keys at positions <= context + i.
    q_pos = torch.arange(context, seq_len, device=q.device)[:, None]
    k_pos = torch.arange(start, seq_len, device=q.device)[None, :]
    mask = k_pos <= q_pos
    if window is not None:
        mask &= k_pos > q_pos - window
    if softcap is not None:
        # SDPA has no soft-capping: the eager formulation, softmax in float32 as transformers does.
        scores = _soft_cap(torch.matmul(q.transpose(0, 1), k.transpose(1, 2)) * scale, softcap)   # [H, Q, L]
        scores = scores.masked_fill(~mask, float("-inf"))
        probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
        return torch.matmul(probs, v).transpose(0, 1)
    o = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(0, 1)[None], k[None], v[None], attn_mask=mask, scale=scale)   # 4-D, as above
    return o[0].transpose(0, 1)                                                 # [Q, H, D]
