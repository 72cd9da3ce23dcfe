"""Triton paged attention: the CUDA implementation of `kernels.attention.paged_attention`.

One kernel, two launches per call:
- decode rows (one query each): a program per (row, KV head, split) holds the G query heads
  that share the KV head as the rows of one tile, so every K/V byte is read once per step
  (the bandwidth floor); long contexts with few rows are cut into splits whose partial
  results (normalized output plus max and sum of the softmax) a second small kernel merges.
- prefill rows (a chunk of queries over a cached prefix): a program per (query tile, KV
  head) packs BLOCK_Q queries x G heads into one BLOCK_M-row tile (flash attention with an
  online softmax, causal mask on absolute positions).

Both walk the paged cache through the block table: key n of a row lives in block
block_tables[row, n // block_size] at offset n % block_size, for any block size.
Accumulation is float32; scores go through exp2 with the scale folded into log2(e).

Sliding-window layers (WINDOW) start each program's key loop at the first key its earliest
query can see, so blocks before the window are never loaded; soft-capped layers (SOFTCAP)
apply softcap * tanh(s / softcap) to the scaled scores before the mask.
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from kernels.attention_metadata import AttentionMetadata
from common import env

_LOG2E = 1.4426950408889634


@triton.jit
def _attn_kernel(
    q_ptr, k_ptr, v_ptr, o_ptr,
    bt_ptr, seq_lens_ptr, tiles_ptr,
    part_o_ptr, part_ml_ptr,
    scale_log2, num_splits, window, cap_scale, cap_log2,
    stride_qt, stride_qh,
    stride_kb, stride_ks, stride_kh,
    stride_vb, stride_vs, stride_vh,
    stride_ot, stride_oh,
    stride_bt,
    HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, G: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_N: tl.constexpr, PAGE: tl.constexpr,
    DECODE: tl.constexpr, SPLIT: tl.constexpr, F32_DOT: tl.constexpr,
    WINDOW: tl.constexpr = False, SOFTCAP: tl.constexpr = False,
):
    pid = tl.program_id(0)
    hkv = tl.program_id(1)
    split = tl.program_id(2)

    if DECODE:
        # Decode rows come first in the flat batch: row r's single query is token r.
        row = pid
        tile_q = pid
        q_end = pid + 1
        seq_len = tl.load(seq_lens_ptr + row).to(tl.int32)
    else:
        # Host-built tile table: (row, first query token of the tile, row's query end, seq_len).
        row = tl.load(tiles_ptr + pid * 4)
        tile_q = tl.load(tiles_ptr + pid * 4 + 1)
        q_end = tl.load(tiles_ptr + pid * 4 + 2)
        seq_len = tl.load(tiles_ptr + pid * 4 + 3)

    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D_PAD)
    d_ok = offs_d < HEAD_DIM
    q_tok = tile_q + offs_m // G                     # query token of each tile row
    head = hkv * G + offs_m % G                      # query head of each tile row
    m_ok = (offs_m < BLOCK_Q * G) & (q_tok < q_end)
    pos = seq_len - (q_end - q_tok)                  # absolute position of each row's query

    q = tl.load(q_ptr + q_tok[:, None] * stride_qt + head[:, None] * stride_qh + offs_d[None, :],
                mask=m_ok[:, None] & d_ok[None, :], other=0.0)

    # Keys this tile may see: up to its last query's position (causal), at most seq_len.
    last_q = tl.minimum(tile_q + BLOCK_Q, q_end)
    kv_end = seq_len - (q_end - last_q)
    lo = 0
    hi = kv_end
    if WINDOW:
        # From the first key the tile's earliest query sees (position first_q - window + 1):
        # nothing before it is loaded (keys are gathered one by one, so no alignment is lost).
        first_q = seq_len - (q_end - tile_q)
        lo = tl.maximum(first_q - window + 1, 0)
    if SPLIT:
        n_tiles = tl.cdiv(kv_end - lo, BLOCK_N)
        per = tl.cdiv(n_tiles, num_splits)
        base_n = lo
        lo = base_n + tl.minimum(split * per, n_tiles) * BLOCK_N
        hi = tl.minimum(base_n + (split + 1) * per * BLOCK_N, kv_end)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D_PAD], tl.float32)
    bt_row = bt_ptr + row.to(tl.int64) * stride_bt
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_ok = offs_n < hi
        blk = tl.load(bt_row + offs_n // PAGE, mask=n_ok, other=0).to(tl.int64)
        within = (offs_n % PAGE).to(tl.int64)
        kv_mask = n_ok[:, None] & d_ok[None, :]
        k = tl.load(k_ptr + (blk * stride_kb + within * stride_ks + hkv * stride_kh)[:, None] + offs_d[None, :],
                    mask=kv_mask, other=0.0).to(q.dtype)
        v = tl.load(v_ptr + (blk * stride_vb + within * stride_vs + hkv * stride_vh)[:, None] + offs_d[None, :],
                    mask=kv_mask, other=0.0).to(q.dtype)
        if F32_DOT:
            s = tl.dot(q.to(tl.float32), tl.trans(k.to(tl.float32)), input_precision="ieee")
        else:
            s = tl.dot(q, tl.trans(k))
        if SOFTCAP:
            # softcap * tanh(scale * s / softcap), then to log2 units; tanh from exp2 (the
            # interpreter has no libdevice): its absolute error is below the scores' float32 rounding.
            x = s * cap_scale
            e = tl.math.exp2(-2.8853900817779268 * tl.abs(x))   # exp(-2|x|)
            t = (1.0 - e) / (1.0 + e)
            s = tl.where(x >= 0, t, -t) * cap_log2
        else:
            s = s * scale_log2
        visible = n_ok[None, :] & (offs_n[None, :] <= pos[:, None])
        if WINDOW:
            visible = visible & (offs_n[None, :] > pos[:, None] - window)
        s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(s - m_safe[:, None])
        alpha = tl.math.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        if F32_DOT:
            pv = tl.dot(p.to(v.dtype).to(tl.float32), v.to(tl.float32), input_precision="ieee")
        else:
            pv = tl.dot(p.to(v.dtype), v)
        acc = acc * alpha[:, None] + pv
        m_i = m_new

    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    if SPLIT:
        # Partials [nd, H, S, D] and [nd, H, S, 2] (float32); merged by _merge_kernel.
        base = (row * (G * tl.num_programs(1)) + head) * num_splits + split
        tl.store(part_o_ptr + base[:, None] * HEAD_DIM + offs_d[None, :], out, mask=m_ok[:, None] & d_ok[None, :])
        tl.store(part_ml_ptr + base * 2, m_i, mask=m_ok)
        tl.store(part_ml_ptr + base * 2 + 1, l_i, mask=m_ok)
    else:
        tl.store(o_ptr + q_tok[:, None] * stride_ot + head[:, None] * stride_oh + offs_d[None, :],
                 out.to(o_ptr.dtype.element_ty), mask=m_ok[:, None] & d_ok[None, :])


@triton.jit
def _merge_kernel(part_o_ptr, part_ml_ptr, o_ptr, num_splits, stride_ot, stride_oh,
                  HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, S_PAD: tl.constexpr):
    row = tl.program_id(0)
    h = tl.program_id(1)
    offs_s = tl.arange(0, S_PAD)
    offs_d = tl.arange(0, D_PAD)
    s_ok = offs_s < num_splits
    base = (row * tl.num_programs(1) + h) * num_splits + offs_s
    m = tl.load(part_ml_ptr + base * 2, mask=s_ok, other=float("-inf"))
    l = tl.load(part_ml_ptr + base * 2 + 1, mask=s_ok, other=0.0)
    o = tl.load(part_o_ptr + base[:, None] * HEAD_DIM + offs_d[None, :],
                mask=s_ok[:, None] & (offs_d[None, :] < HEAD_DIM), other=0.0)
    m_max = tl.max(m, 0)
    w = tl.where(l > 0, l * tl.math.exp2(m - m_max), 0.0)
    out = tl.sum(o * w[:, None], 0) / tl.sum(w, 0)
    tl.store(o_ptr + row * stride_ot + h * stride_oh + offs_d, out.to(o_ptr.dtype.element_ty),
             mask=offs_d < HEAD_DIM)


# Tile table of the prefill rows, cached for the last metadata object: every layer of one
# forward pass gets the same AttentionMetadata, so the table crosses to the device once a step.
_tile_cache: tuple[AttentionMetadata, int, torch.device, torch.Tensor] | None = None


def _prefill_tiles(meta: AttentionMetadata, block_q: int, device: torch.device) -> torch.Tensor:
    global _tile_cache
    c = _tile_cache
    if c is not None and c[0] is meta and c[1] == block_q and c[2] == device:
        return c[3]
    tiles: list[int] = []
    for row in range(meta.num_decodes, len(meta.seq_lens)):
        start, end = meta.query_start_loc[row], meta.query_start_loc[row + 1]
        for t in range(start, end, block_q):
            tiles += (row, t, end, meta.seq_lens[row])
    table = torch.tensor(tiles, dtype=torch.int32).to(device, non_blocking=True)
    _tile_cache = (meta, block_q, device, table)
    return table


@functools.lru_cache(maxsize=None)
def _sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


# Launch settings: first choices, not yet timed on a GPU; bench/gpu_kernels.py sweeps the decode
# ones (see kernels/NOTES.md).
DECODE_BLOCK_N = 64
DECODE_WARPS = 4
DECODE_STAGES = 3
PREFILL_BLOCK_M = 64
PREFILL_BLOCK_N = 64
PREFILL_WARPS = 4
PREFILL_STAGES = 2


def paged_attention_triton(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
    *,
    out: torch.Tensor | None = None,
    num_splits: int | None = None,
    decode_block_n: int | None = None,
    decode_warps: int | None = None,
    decode_stages: int | None = None,
    window: int | None = None,
    softcap: float | None = None,
) -> torch.Tensor:
    """Same contract as `paged_attention_ref`. `out` (optional, [T, H, D]) receives the result;
    `num_splits` forces the decode split count (None: chosen from the grid size)."""
    num_tokens, num_heads, head_dim = q.shape
    num_kv_heads = k_cache.shape[2]
    group = num_heads // num_kv_heads
    assert group * num_kv_heads == num_heads, "query heads must be a multiple of KV heads"
    assert k_cache.stride(-1) == 1 and v_cache.stride(-1) == 1
    if q.stride(-1) != 1:
        q = q.contiguous()
    if out is None:
        out = torch.empty_like(q)
    assert out.shape == q.shape and out.stride(-1) == 1
    d_pad = max(16, _next_pow2(head_dim))   # tl.dot needs K >= 16
    # float32 inputs: exact float32 products (not tf32). The interpreter's dot mishandles
    # bf16/fp16 operands, so there the (already rounded) operands go through float32 too.
    f32_dot = q.dtype == torch.float32 or env.triton_interpret()
    bt = meta.block_tables
    nd = meta.num_decodes
    num_rows = len(meta.seq_lens)
    scale_log2 = float(scale) * _LOG2E
    cap_scale = float(scale) / softcap if softcap else 0.0
    cap_log2 = float(softcap) * _LOG2E if softcap else 0.0
    layer_args = (int(window or 0), cap_scale, cap_log2)
    common = dict(
        HEAD_DIM=head_dim, D_PAD=d_pad, G=group, PAGE=meta.block_size, F32_DOT=f32_dot,
        WINDOW=window is not None, SOFTCAP=softcap is not None,
    )
    strides = (q.stride(0), q.stride(1), *k_cache.stride()[:3], *v_cache.stride()[:3],
               out.stride(0), out.stride(1), bt.stride(0))

    if nd:
        block_n = decode_block_n or DECODE_BLOCK_N
        block_m = max(16, _next_pow2(group))
        if num_splits is None:
            # Enough programs to fill the chip twice over, but at least 4 KV tiles per split.
            max_len = max(meta.seq_lens[:nd]) if window is None else min(max(meta.seq_lens[:nd]), window)
            want = -(-2 * _sm_count(q.device) // (nd * num_kv_heads))
            num_splits = max(1, min(want, -(-max_len // (4 * block_n)), 64))
        split = num_splits > 1
        if split:
            part_o = torch.empty((nd, num_heads, num_splits, head_dim), dtype=torch.float32, device=q.device)
            part_ml = torch.empty((nd, num_heads, num_splits, 2), dtype=torch.float32, device=q.device)
        else:
            part_o = part_ml = out  # unused
        _attn_kernel[(nd, num_kv_heads, num_splits)](
            q, k_cache, v_cache, out, bt, meta.seq_lens_t, bt, part_o, part_ml,
            scale_log2, num_splits, *layer_args, *strides,
            BLOCK_M=block_m, BLOCK_Q=1, BLOCK_N=block_n, DECODE=True, SPLIT=split,
            num_warps=decode_warps or DECODE_WARPS, num_stages=decode_stages or DECODE_STAGES, **common,
        )
        if split:
            _merge_kernel[(nd, num_heads)](
                part_o, part_ml, out, num_splits, out.stride(0), out.stride(1),
                HEAD_DIM=head_dim, D_PAD=d_pad, S_PAD=max(2, _next_pow2(num_splits)),
            )

    if num_rows > nd:
        block_m = max(PREFILL_BLOCK_M, _next_pow2(group))
        block_q = block_m // group
        tiles = _prefill_tiles(meta, block_q, q.device)
        n_tiles = tiles.numel() // 4
        _attn_kernel[(n_tiles, num_kv_heads, 1)](
            q, k_cache, v_cache, out, bt, meta.seq_lens_t, tiles, out, out,
            scale_log2, 1, *layer_args, *strides,
            BLOCK_M=block_m, BLOCK_Q=block_q, BLOCK_N=PREFILL_BLOCK_N, DECODE=False, SPLIT=False,
            num_warps=PREFILL_WARPS, num_stages=PREFILL_STAGES, **common,
        )
    return out

