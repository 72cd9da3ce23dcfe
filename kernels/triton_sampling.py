"""Triton sampler: the CUDA twin of `kernels.sampling.sample_tokens_ref` (same tokens, same
counter-based uniforms). NOT used by the engine, which samples with `decoding.sampling.Sampler`
on every device (kernels/NOTES.md, "Sampler", says why); reached from tests/test_kernels.py and
`python -m bench gpu_kernels` only.

A program per row streams the row in BLOCK_V chunks (it stays in L2 between passes):
greedy rows take one argmax pass; sampled rows take a min/max pass, a bisection on the
order-preserving int32 keys for the top-k threshold (the k-th largest key: <= 32 counting
passes, only when top-k is on), a bisection for the top-p threshold (<= 32 passes summing
exp(z - max), only when top-p is on), and one Gumbel-max pass whose noise is the counter-based
hash of (seed, position, token id) shared with the torch reference.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels import sampling_constants as _c
from kernels.sampling_constants import GREEDY_TEMPERATURE

# Globals read inside jit functions must be constexpr.
_FMIX_C1 = tl.constexpr(_c.FMIX_C1)
_FMIX_C2 = tl.constexpr(_c.FMIX_C2)
_SEED_SALT = tl.constexpr(_c.SEED_SALT)
_TOKEN_SALT = tl.constexpr(_c.TOKEN_SALT)


@triton.jit
def _fmix32(x):
    x = x ^ (x >> 16)
    x = x * _FMIX_C1
    x = x ^ (x >> 13)
    x = x * _FMIX_C2
    return x ^ (x >> 16)


@triton.jit
def _row_hash(seed, pos):
    s_lo = (seed & 0xFFFFFFFF).to(tl.uint32)
    s_hi = ((seed >> 32) & 0xFFFFFFFF).to(tl.uint32)
    p_lo = (pos & 0xFFFFFFFF).to(tl.uint32)
    p_hi = ((pos >> 32) & 0xFFFFFFFF).to(tl.uint32)
    h = _fmix32(s_lo ^ _SEED_SALT)
    h = _fmix32(h ^ s_hi)
    h = _fmix32(h ^ p_lo)
    return _fmix32(h ^ p_hi)


@triton.jit
def _uniform(h, offs):
    r = _fmix32(h ^ _fmix32(offs.to(tl.uint32) + _TOKEN_SALT))
    return ((r >> 9).to(tl.float32) + 0.5) * (1.0 / 8388608.0)


@triton.jit
def _order_key(z):
    bits = z.to(tl.int32, bitcast=True)
    return tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)


@triton.jit
def _sample_kernel(
    logits_ptr, stride_l, vocab,
    temp_ptr, topk_ptr, topp_ptr, seed_ptr, pos_ptr, out_ptr,
    GREEDY_EPS: tl.constexpr, BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0)
    base = logits_ptr + row.to(tl.int64) * stride_l
    t = tl.load(temp_ptr + row).to(tl.float32)
    offs0 = tl.arange(0, BLOCK_V)
    best = float("-inf")
    best_i = 0
    if t < GREEDY_EPS:
        for start in range(0, vocab, BLOCK_V):
            offs = start + offs0
            x = tl.load(base + offs, mask=offs < vocab, other=float("-inf")).to(tl.float32)
            bmax = tl.max(x, 0)
            bidx = tl.argmax(x, 0) + start
            take = bmax > best
            best_i = tl.where(take, bidx, best_i)
            best = tl.where(take, bmax, best)
    else:
        k = tl.load(topk_ptr + row).to(tl.int64)
        p = tl.load(topp_ptr + row).to(tl.float32)
        zmax = float("-inf")
        kmin = 2147483647
        kmax = -2147483648
        for start in range(0, vocab, BLOCK_V):
            offs = start + offs0
            ok = offs < vocab
            z = tl.math.div_rn(tl.load(base + offs, mask=ok, other=0.0).to(tl.float32), t)
            key = _order_key(z)
            zmax = tl.maximum(zmax, tl.max(tl.where(ok, z, float("-inf")), 0))
            kmin = tl.minimum(kmin, tl.min(tl.where(ok, key, 2147483647), 0))
            kmax = tl.maximum(kmax, tl.max(tl.where(ok, key, -2147483648), 0))
        thr = kmin.to(tl.int64)
        if (k > 0) & (k < vocab):
            # Largest threshold with count(key >= threshold) >= k: the k-th largest key.
            lo = kmin.to(tl.int64)
            hi = kmax.to(tl.int64) + 1
            while hi - lo > 1:
                mid = lo + (hi - lo) // 2
                cnt = 0
                for start in range(0, vocab, BLOCK_V):
                    offs = start + offs0
                    ok = offs < vocab
                    z = tl.math.div_rn(tl.load(base + offs, mask=ok, other=0.0).to(tl.float32), t)
                    cnt += tl.sum((ok & (_order_key(z) >= mid)).to(tl.int32), 0)
                big = cnt >= k
                lo = tl.where(big, mid, lo)
                hi = tl.where(big, hi, mid)
            thr = lo
        if p < 1.0:
            total = 0.0
            for start in range(0, vocab, BLOCK_V):
                offs = start + offs0
                ok = offs < vocab
                z = tl.math.div_rn(tl.load(base + offs, mask=ok, other=0.0).to(tl.float32), t)
                e = tl.exp(z - zmax)
                total += tl.sum(tl.where(ok & (_order_key(z) >= thr), e, 0.0), 0)
            target = p * total
            # Smallest threshold v with mass(key > v) < p * Z; tokens with key >= v are kept.
            lo = thr - 1
            hi = kmax.to(tl.int64)
            while hi - lo > 1:
                mid = lo + (hi - lo) // 2
                mass = 0.0
                for start in range(0, vocab, BLOCK_V):
                    offs = start + offs0
                    ok = offs < vocab
                    z = tl.math.div_rn(tl.load(base + offs, mask=ok, other=0.0).to(tl.float32), t)
                    key = _order_key(z)
                    e = tl.exp(z - zmax)
                    mass += tl.sum(tl.where(ok & (key > mid) & (key >= thr), e, 0.0), 0)
                small = mass < target
                hi = tl.where(small, mid, hi)
                lo = tl.where(small, lo, mid)
            thr = hi
        h = _row_hash(tl.load(seed_ptr + row).to(tl.int64), tl.load(pos_ptr + row).to(tl.int64))
        for start in range(0, vocab, BLOCK_V):
            offs = start + offs0
            ok = offs < vocab
            z = tl.math.div_rn(tl.load(base + offs, mask=ok, other=0.0).to(tl.float32), t)
            g = -tl.log(-tl.log(_uniform(h, offs)))
            score = tl.where(ok & (_order_key(z) >= thr), z + g, float("-inf"))
            bmax = tl.max(score, 0)
            bidx = tl.argmax(score, 0) + start
            take = bmax > best
            best_i = tl.where(take, bidx, best_i)
            best = tl.where(take, bmax, best)
    tl.store(out_ptr + row, best_i.to(tl.int64))


@triton.jit
def _uniform_kernel(seed_ptr, pos_ptr, out_ptr, vocab, BLOCK_V: tl.constexpr):
    row = tl.program_id(0)
    offs = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    h = _row_hash(tl.load(seed_ptr + row).to(tl.int64), tl.load(pos_ptr + row).to(tl.int64))
    tl.store(out_ptr + row.to(tl.int64) * vocab + offs, _uniform(h, offs), mask=offs < vocab)


def uniforms_triton(seeds: torch.Tensor, positions: torch.Tensor, vocab: int) -> torch.Tensor:
    """The kernel's uniforms as a [B, V] tensor (for checking them against uniforms_ref)."""
    out = torch.empty((seeds.numel(), vocab), dtype=torch.float32, device=seeds.device)
    block_v = 1024
    _uniform_kernel[(seeds.numel(), triton.cdiv(vocab, block_v))](seeds, positions, out, vocab, BLOCK_V=block_v)
    return out


def sample_tokens_triton(
    logits: torch.Tensor,
    temperature: torch.Tensor,
    top_k: torch.Tensor,
    top_p: torch.Tensor,
    seeds: torch.Tensor,
    positions: torch.Tensor,
    *,
    out: torch.Tensor | None = None,
    block_v: int = 2048,
) -> torch.Tensor:
    num_rows, vocab = logits.shape
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    if out is None:
        out = torch.empty(num_rows, dtype=torch.int64, device=logits.device)
    if num_rows == 0:
        return out
    dev = logits.device
    _sample_kernel[(num_rows,)](
        logits, logits.stride(0), vocab,
        temperature.to(dev, torch.float32), top_k.to(dev, torch.int64), top_p.to(dev, torch.float32),
        seeds.to(dev, torch.int64), positions.to(dev, torch.int64), out,
        GREEDY_EPS=GREEDY_TEMPERATURE, BLOCK_V=block_v, num_warps=8,
    )
    return out
