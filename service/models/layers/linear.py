"""One projection of a step, on the copy of its weight that suits the step's row count.

A float32 model multiplies its float32 weights (sgemm). A Llama-family model built for bfloat16
on a CPU (service/models/bf16_packed.py) also carries each weight's bf16 bits: steps of few rows
stream them through the native kernels, and steps of many rows (prefill chunks, large batches)
multiply them here by bf16 GEMM (MKL's gemm_bf16bf16f32, exported by torch's own library: bf16
products, float32 sums and output), which on a CPU with AVX512-BF16 runs at about twice float32
sgemm's rate and with AMX at three or more times. The residual stream, attention and norms stay
float32.
"""
from __future__ import annotations

import time

import torch
import torch.nn.functional as F
from torch import nn

from decoding.sampling import MAX_SPECULATIVE_TOKENS
from kernels import cpu_native, quant

# Rows from which a bf16 weight multiplies in bf16 (a GGUF's blocks on AMX tiles, else bf16 GEMM);
# fewer rows take the packed copy (exact float32 accumulation: decoding is float32's). With AMX
# the bf16 products win from a few rows: the default model's 120 projections (weights out of
# cache), 2 cores of a Xeon with AMX, 16 rows: 9 ms on AMX tiles from the Q4_1 blocks, ~20 ms by
# MKL's GEMM on the bf16 copies, 29 ms by the float32 kernel on the blocks; 32 rows: 12, 24, 57.
# For MKL's GEMM on bf16 copies (no GGUF blocks, or no AMX) 16, not lower, keeps one request's
# speculative verify steps (up to 9 rows at the adaptive k <= 8) on the float32 path: a request
# decoding alone gets the same tokens with and without speculation.
# Without AMX (AVX512-BF16 only) the crossover is higher: on an AMD EPYC, 16 decode rows ran 272
# tok/s native against 208 by GEMM in the torch loop; 32 rows 244 against 264-271.
BF16_GEMM_MIN_ROWS = 16 if torch.cpu._is_amx_tile_supported() else quant.PACKED_MAX_ROWS + 1

# bf16 mode, a GGUF's blocks, a CPU with AMX: rows from which a step multiplies the blocks in bf16
# on AMX tiles (kernels/csrc/cpu_qmatmul.c, weft_qmatmul_amx), in the native loop, the torch loop
# and the logits; fewer rows take the float32 kernel on the same blocks. The float32 kernel's cost
# grows with the rows, the tiles' hardly, and one row costs the tiles more (de-quantising to bf16
# and storing the A tile): the default model's 120 projections, weights out of cache, 2 cores of
# a Xeon with AMX, ms: 1 row 3.6 float32 against 6.3 tiles, 4 rows 6.2 / 6.8, 5 rows 7.1 / 6.9,
# 8 rows 11.3 / 7.4, 16 rows 20.7 / 7.1 (kernels/NOTES.md, "Prefetching the rows").
AMX_MIN_ROWS = 5
# ... but a step of one sequence alone stays float32 below this many rows: its speculative verify
# steps (up to k + 1 rows) then take the same products as its plain decode steps, so a request
# decoding alone gets the same tokens with and without speculation, at every k.
LONE_AMX_MIN_ROWS = MAX_SPECULATIVE_TOKENS + 2


def amx_min_rows(sequences: int) -> int:
    """bf16 mode on AMX: the rows from which a step of `sequences` sequences multiplies on tiles."""
    return AMX_MIN_ROWS if sequences > 1 else LONE_AMX_MIN_ROWS


def bf16_gemm_available() -> bool:
    """Whether this CPU runs bf16 dot products natively (AVX512-BF16 or AMX): without them oneDNN
    emulates bf16 and sgemm on float32 weights is the faster path."""
    cpu = torch.cpu
    return bool(cpu._is_avx512_bf16_supported() or cpu._is_amx_tile_supported())


def gemm_gflops(rows: int, k: int, n: int, dtype: torch.dtype, repeats: int = 5) -> float:
    """GFLOPS of x [rows, k] @ W [n, k]^T in `dtype` on this CPU now (the best of `repeats` after a
    warm-up call): what `--dtype auto` compares, at the shapes of the model it serves."""
    x, w = torch.randn(rows, k).to(dtype), torch.randn(n, k).to(dtype)
    F.linear(x, w)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        F.linear(x, w)
        best = min(best, time.perf_counter() - t0)
    return 2.0 * rows * k * n / best / 1e9


def set_bf16_gemm(proj: nn.Module, weight: torch.Tensor | None, tiles: bool = False) -> None:
    """Give `proj` (an nn.Linear) the bf16 [out, in] weight that steps of many rows multiply, or
    take it away (None); `tiles`: its GGUF blocks multiply in bf16 on AMX tiles instead (every
    step, no copy needed)."""
    proj.__dict__["bf16_gemm"] = weight
    proj.__dict__["bf16_tiles"] = tiles


def bf16_weight(proj: nn.Module) -> torch.Tensor | None:
    # A plain dict read: nn.Module's __getattr__ fallback costs microseconds a call.
    return proj.__dict__.get("bf16_gemm")


def bf16_matmul(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [t, in] float32 @ weight [out, in] bf16 ^T (+ bias) -> float32, by bf16 GEMM: MKL's, with
    float32 output, as the native loop's steps (kernels/cpu_native.bf16_linear); torch's, whose
    output is rounded to bf16, where that is missing."""
    if cpu_native.has_bf16_gemm() and x.dim() == 2 and weight.is_contiguous():
        return cpu_native.bf16_linear(x, weight, bias)
    y = F.linear(x.to(torch.bfloat16), weight).float()
    if bias is not None:
        y += bias
    return y


def project(x: torch.Tensor, proj: nn.Linear, tile_rows: int = AMX_MIN_ROWS) -> torch.Tensor:
    """proj(x) for one step of the torch loop. bf16 mode: a GGUF's blocks on AMX tiles when the step
    has at least `tile_rows` rows (`amx_min_rows` of its sequences), as the native loop multiplies
    them (the same sums as MKL's GEMM on a bf16 copy, bit for bit); else bf16 GEMM on the copy when
    the step has many rows. Otherwise F.linear on its own weight."""
    d = proj.__dict__
    if d.get("bf16_tiles") and x.shape[0] >= tile_rows and quant.amx_usable(x, d.get("packed")):
        y = quant.qmatmul_amx(x, d["packed"])
        if proj.bias is not None:
            y += proj.bias
        return y
    w16 = d.get("bf16_gemm")
    if w16 is not None and x.shape[0] >= BF16_GEMM_MIN_ROWS:
        return bf16_matmul(x, w16, proj.bias)
    return F.linear(x, proj.weight, proj.bias)
