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

# bf16 mode, a GGUF's blocks, a CPU with AMX: rows from which the native loop and the logits
# multiply the blocks on AMX tiles (kernels/csrc/cpu_qmatmul.c, weft_qmatmul_amx). Every step:
# one row costs the tiles what the float32 kernel costs (both read the blocks at the memory's
# speed: 6.1 against 6.5 ms for the default model's projections), 9 rows ~7.5 against ~17. So a
# speculative verify step costs little more than a plain decode; and since every decode and
# verify row takes the same bf16 products, batch-invariant row by row, speculation stays lossless.
AMX_MIN_ROWS = 1


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


def project(x: torch.Tensor, proj: nn.Linear) -> torch.Tensor:
    """proj(x) for one step. bf16 mode: a GGUF's blocks on AMX tiles, as the native loop
    multiplies them (the same sums as MKL's GEMM on a bf16 copy, bit for bit, and faster at every
    row count: the rows are de-quantised once per call); else bf16 GEMM on the copy when the step
    has many rows. Otherwise F.linear on its own weight."""
    d = proj.__dict__
    if d.get("bf16_tiles") and x.shape[0] >= AMX_MIN_ROWS and quant.amx_usable(x, d.get("packed")):
        y = quant.qmatmul_amx(x, d["packed"])
        if proj.bias is not None:
            y += proj.bias
        return y
    w16 = d.get("bf16_gemm")
    if w16 is not None and x.shape[0] >= BF16_GEMM_MIN_ROWS:
        return bf16_matmul(x, w16, proj.bias)
    return F.linear(x, proj.weight, proj.bias)
