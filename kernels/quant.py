"""Matmuls that read GGUF-quantised weight rows directly (float32 CPU, kernels/csrc/cpu_qmatmul.c).

A model loaded from a GGUF runs in float32, but its weights are exactly the de-quantised blocks;
at M = 1 a step is bound by the bytes of weight it streams, so reading the Q4_1 / Q8_0 blocks
instead of their float32 copies is ~4-5x fewer bytes. The float32 weights stay: above
PACKED_MAX_ROWS rows per step BLAS sgemm on them is faster (its cost hardly grows with the rows,
ours does). `WEFT_PACKED=0` turns this off (A/B).
"""
from __future__ import annotations

import dataclasses

import torch

from kernels import cpu_native
from common import env

FMT_Q8_0, FMT_Q4_1 = 1, 2
BLOCK = 32
GGUF_BLOCK_BYTES = {FMT_Q8_0: 34, FMT_Q4_1: 20}   # fp16 d (, fp16 m), quants

# Steps with at most this many rows use the packed weights; more go to sgemm on float32. From
# the measured crossover against MKL sgemm on the default model, 2 cores (`make bench
# BENCH=qmatmul`; kernels/NOTES.md, "Quantised GEMV"): on a Sapphire Rapids part decoder
# projections ~48-64 rows, the 49152 x 576 Q8_0 lm_head ~32 (a tie there); on an AMD EPYC,
# where MKL's sgemm is slower, both past 96. So: the Intel part's crossover (with a margin
# for the projections), which the AMD part clears easily.
PACKED_MAX_ROWS = 32
LOGITS_PACKED_MAX_ROWS = 32


def enabled() -> bool:
    return env.packed_enabled()


@dataclasses.dataclass(frozen=True)
class PackedWeight:
    """A [n, k] weight in the layout kernels/csrc/cpu_qmatmul.c reads: `data` is uint8
    [n, row bytes], each row its float32 scales (Q4_1: then offsets) then its quants."""

    data: torch.Tensor
    fmt: int
    n: int
    k: int


def from_gguf_blocks(blocks: torch.Tensor | list[torch.Tensor], fmt: int, k: int) -> PackedWeight:
    """Repack GGUF rows (uint8 [n, k / 32 * block bytes]; a list is stacked along n): scales to
    float32 (exact), quants as they are. Written straight into the result: no stacked copy."""
    parts = blocks if isinstance(blocks, list) else [blocks]
    nb = k // BLOCK
    n = sum(p.shape[0] for p in parts)
    # Per block: GGUF has the quants after 2 (Q8_0: fp16 d) or 4 bytes (Q4_1: fp16 d, m).
    quants_at, quant_bytes = (2, 32) if fmt == FMT_Q8_0 else (4, 16)
    scale_bytes = 2 * quants_at * nb
    out = torch.empty(n, scale_bytes + quant_bytes * nb, dtype=torch.uint8)
    row = 0
    for part in parts:
        rows = part.shape[0]
        # Blocks are an even number of bytes: as int16 words the fp16 scales are whole
        # elements, gathered and converted to float32 in one copy.
        words = part.view(torch.int16).reshape(rows, nb, GGUF_BLOCK_BYTES[fmt] // 2)
        dst = out[row:row + rows]
        dst[:, :4 * nb].view(torch.float32).copy_(words[..., 0].view(torch.float16))
        if fmt == FMT_Q4_1:
            dst[:, 4 * nb:8 * nb].view(torch.float32).copy_(words[..., 1].view(torch.float16))
        dst[:, scale_bytes:].view(rows, nb, quant_bytes).copy_(part.reshape(rows, nb, -1)[..., quants_at:])
        row += rows
    return PackedWeight(out, fmt, n, k)


def dequantize(p: PackedWeight) -> torch.Tensor:
    """float32 [n, k], computed as gguf-py (and so transformers' loader) does: d * q (+ m),
    rounding the product and the sum separately. In place where it can: it runs over every
    weight at load."""
    nb = p.k // BLOCK
    d = p.data[:, :4 * nb].view(torch.float32).reshape(p.n, nb, 1)
    w = torch.empty(p.n, nb, BLOCK, dtype=torch.float32)
    if p.fmt == FMT_Q8_0:
        w.copy_(p.data[:, 4 * nb:].view(torch.int8).reshape(p.n, nb, BLOCK))
        w.mul_(d)
    else:
        m = p.data[:, 4 * nb:8 * nb].view(torch.float32).reshape(p.n, nb, 1)
        qs = p.data[:, 8 * nb:].reshape(p.n, nb, BLOCK // 2)
        q = torch.empty(p.n, nb, BLOCK, dtype=torch.uint8)
        torch.bitwise_and(qs, 15, out=q[..., :BLOCK // 2])
        torch.bitwise_right_shift(qs, 4, out=q[..., BLOCK // 2:])
        w.copy_(q)
        w.mul_(d).add_(m)
    return w.reshape(p.n, p.k)


def equals_weight(p: PackedWeight, weight: torch.Tensor) -> bool:
    """Whether `p` de-quantises to `weight` (float32 [n, k]) exactly: one native pass over both
    when the kernels are built (the load-time check of every packed tensor), else `dequantize`."""
    if tuple(weight.shape) != (p.n, p.k) or weight.dtype != torch.float32 or weight.device.type != "cpu":
        return False
    weight = weight.contiguous()
    lib = cpu_native.lib() if cpu_native.enabled() else None
    if lib is None:
        return torch.equal(dequantize(p), weight)
    return lib.weft_qcheck_f32(p.data.data_ptr(), p.fmt, p.n, p.k, weight.data_ptr(), torch.get_num_threads()) == 0


def usable(x: torch.Tensor, p: PackedWeight | None, max_rows: int = PACKED_MAX_ROWS) -> bool:
    """Whether qmatmul should run x @ p^T: few rows, float32 CPU, native kernels built."""
    return (p is not None and enabled() and x.dim() == 2 and 0 < x.shape[0] <= max_rows
            and cpu_native.usable(x))


def qmatmul(x: torch.Tensor, p: PackedWeight) -> torch.Tensor:
    """x [m, k] float32 @ W^T -> [m, n] float32 (native; callers check `usable` first)."""
    x = x.contiguous()
    y = torch.empty(x.shape[0], p.n, dtype=torch.float32)
    rc = cpu_native.lib().weft_qmatmul_f32(x.data_ptr(), x.shape[0], p.k, p.data.data_ptr(), p.fmt, p.n,
                                           y.data_ptr(), p.n, torch.get_num_threads())
    if rc != 0:
        raise RuntimeError(f"weft_qmatmul_f32 failed (code {rc})")
    return y
