"""Matmuls that read GGUF-quantised weight rows directly (float32 CPU, kernels/csrc/cpu_qmatmul.c).

A model loaded from a GGUF runs in float32, but its weights are exactly the de-quantised blocks;
at M = 1 a step is bound by the bytes of weight it streams, so reading the blocks (Q8_0, the
legacy 4/5-bit types and the K-quants, repacked at load: kernels/gguf_blocks.py) instead of their
float32 copies is ~3-5x fewer bytes. The float32 weights stay: above
PACKED_MAX_ROWS rows per step BLAS sgemm on them is faster (its cost hardly grows with the rows,
ours does). `WEFT_PACKED=0` turns this off (A/B). A model loaded with dtype bfloat16 on CPU
streams its weights' bf16 bits the same way (FMT_BF16: half the bytes of float32).
"""
from __future__ import annotations

import dataclasses

import torch

from kernels import cpu_native, gguf_blocks
from common import env

# The packed layouts (kernels/csrc/cpu_qmatmul.c); kernels/gguf_blocks.py maps each GGUF type to one.
FMT_Q8_0, FMT_Q4_1, FMT_Q5_1, FMT_Q6_K, FMT_SEGMENTS = 1, 2, 3, 4, 5
# Not a GGUF type: a weight's bfloat16 bits, which the kernel widens exactly (from_bf16).
FMT_BF16 = 6
FORMATS = {"Q8_0": FMT_Q8_0, "Q4_1": FMT_Q4_1, "Q5_1": FMT_Q5_1, "Q6_K": FMT_Q6_K}
BLOCK = 32
# Bytes of one 32-weight block in each packed layout: float32 scales (, offsets, fifth bits), quants.
_PACKED_BLOCK_BYTES = {FMT_Q8_0: 4 + 32, FMT_Q4_1: 8 + 16, FMT_Q5_1: 8 + 4 + 16, FMT_Q6_K: 8 + 32}
_HEADER_ALIGN = 64

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
    [n, row bytes], each row its float32 scales (then offsets, fifth bits) then its quants. A
    fused tensor whose parts have different layouts is FMT_SEGMENTS: `data` is an int64 header
    (count, then fmt, rows, byte offset per segment) and the segments, which `segments` views."""

    data: torch.Tensor
    fmt: int
    n: int
    k: int
    segments: tuple[PackedWeight, ...] = ()


def from_gguf_blocks(blocks: torch.Tensor | list[torch.Tensor], gguf_type: str | list[str], k: int) -> PackedWeight:
    """Repack GGUF rows (uint8 [n, bytes per row]; a list is stacked along n, `gguf_type` then one
    type or one per part) into the packed layouts, each part written straight into the result.
    Consecutive parts of one layout share a segment; one segment is a plain PackedWeight."""
    parts = blocks if isinstance(blocks, list) else [blocks]
    types = gguf_type if isinstance(gguf_type, list) else [gguf_type] * len(parts)
    groups: list[tuple[int, list[tuple[torch.Tensor, str]]]] = []
    for part, t in zip(parts, types):
        fmt = FORMATS[gguf_blocks.LAYOUT[t]]
        if groups and groups[-1][0] == fmt:
            groups[-1][1].append((part, t))
        else:
            groups.append((fmt, [(part, t)]))
    sizes = [(fmt, sum(p.shape[0] for p, _ in g)) for fmt, g in groups]
    if len(groups) == 1:
        out = torch.empty(sizes[0][1], _row_bytes(groups[0][0], k), dtype=torch.uint8)
        return _fill(out, groups[0][0], groups[0][1], k)
    header = -(-8 * (1 + 3 * len(groups)) // _HEADER_ALIGN) * _HEADER_ALIGN
    offsets = [header]
    for fmt, rows in sizes:
        offsets.append(offsets[-1] + rows * _row_bytes(fmt, k))
    data = torch.zeros(offsets[-1], dtype=torch.uint8)
    data[:header].view(torch.int64)[:1 + 3 * len(groups)] = torch.tensor(
        [len(groups)] + [v for (fmt, rows), at in zip(sizes, offsets) for v in (fmt, rows, at)])
    segments = tuple(_fill(data[at:end].view(rows, -1), fmt, g, k)
                     for (fmt, g), (_, rows), at, end in zip(groups, sizes, offsets, offsets[1:]))
    return PackedWeight(data, FMT_SEGMENTS, sum(rows for _, rows in sizes), k, segments)


def from_bf16(weight: torch.Tensor) -> PackedWeight:
    """The FMT_BF16 copy of `weight` ([n, k], k a multiple of 32): its values rounded to bfloat16,
    2 bytes a weight. Exact for a float32 weight that already holds bf16 values (equals_weight)."""
    n, k = weight.shape
    if k % BLOCK:
        raise ValueError(f"k = {k} is not a multiple of {BLOCK}")
    data = weight.detach().to(device="cpu", dtype=torch.bfloat16).contiguous().view(torch.uint8)
    return PackedWeight(data, FMT_BF16, n, k)


def _row_bytes(fmt: int, k: int) -> int:
    return k // BLOCK * _PACKED_BLOCK_BYTES[fmt]


def _fill(out: torch.Tensor, fmt: int, parts: list[tuple[torch.Tensor, str]], k: int) -> PackedWeight:
    """Write `parts` (GGUF rows, their type) into `out` (uint8 [n, row bytes]) in layout `fmt`."""
    nb = k // BLOCK
    row = 0
    for part, gguf_type in parts:
        dec = gguf_blocks.decode(part, gguf_type, k)
        dst = out[row:row + part.shape[0]]
        scales = dec.d.shape[1]   # nb, or 2 nb (Q6_K: a scale per 16 weights)
        dst[:, :4 * scales].view(torch.float32).copy_(dec.d)
        at = 4 * scales
        if dec.m is not None:
            dst[:, at:at + 4 * nb].view(torch.float32).copy_(dec.m)
            at += 4 * nb
        if dec.qh is not None:
            dst[:, at:at + 4 * nb].view(-1, nb, 4).copy_(dec.qh)
            at += 4 * nb
        dst[:, at:].view(dec.qs.shape).copy_(dec.qs)
        row += part.shape[0]
    return PackedWeight(out, fmt, out.shape[0], k)


def _unpack(p: PackedWeight) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """(d [n, groups, 1], m [n, nb, 1] or None, q [n, groups, 32 or 16] as float32) of one layout."""
    nb = p.k // BLOCK
    scales = 2 * nb if p.fmt == FMT_Q6_K else nb
    d = p.data[:, :4 * scales].view(torch.float32).reshape(p.n, scales, 1)
    at = 4 * scales
    m = None
    if p.fmt in (FMT_Q4_1, FMT_Q5_1):
        m = p.data[:, at:at + 4 * nb].view(torch.float32).reshape(p.n, nb, 1)
        at += 4 * nb
        fifth = None
        if p.fmt == FMT_Q5_1:
            qh = p.data[:, at:at + 4 * nb].reshape(p.n, nb, 4, 1)
            fifth = ((qh >> torch.arange(8, dtype=torch.uint8)) & 1).reshape(p.n, nb, BLOCK)
            at += 4 * nb
        qs = p.data[:, at:].reshape(p.n, nb, BLOCK // 2)
        q = torch.cat([qs & 15, qs >> 4], dim=-1)
        if fifth is not None:
            q |= fifth << 4
        return d, m, q.float()
    return d, m, p.data[:, at:].view(torch.int8).reshape(p.n, scales, -1).float()


def dequantize(p: PackedWeight) -> torch.Tensor:
    """float32 [n, k], computed as gguf-py (and so transformers' loader) does: d * q (+ m),
    rounding the product and the sum separately (the product is exact for every layout)."""
    if p.fmt == FMT_SEGMENTS:
        return torch.cat([dequantize(s) for s in p.segments])
    if p.fmt == FMT_BF16:
        return p.data.view(torch.bfloat16).float()
    d, m, q = _unpack(p)
    w = q.mul_(d)
    if m is not None:
        w.view(p.n, p.k // BLOCK, BLOCK).add_(m)
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


def amx_shaped(p: PackedWeight | None) -> bool:
    """Whether qmatmul_amx takes `p`: GGUF blocks (not FMT_BF16) in whole tiles (16 rows of each
    segment, k a multiple of 32)."""
    return (p is not None and p.fmt != FMT_BF16 and p.k % BLOCK == 0
            and all(part.n % 16 == 0 for part in p.segments or (p,)))


def amx_usable(x: torch.Tensor, p: PackedWeight | None) -> bool:
    """Whether qmatmul_amx can run x @ p^T: `amx_shaped` blocks, float32 CPU, AMX."""
    return amx_shaped(p) and enabled() and x.dim() == 2 and cpu_native.usable(x) and cpu_native.has_amx()


def qmatmul_amx(x: torch.Tensor, p: PackedWeight) -> torch.Tensor:
    """x [m, k] float32 @ W^T -> [m, n] float32 in bf16 products on AMX tiles: x and the de-quantised
    weights rounded to bf16, float32 sums (bf16 mode's steps on a CPU with AMX; callers check
    `amx_usable` first)."""
    return _native_product("weft_qmatmul_amx", x, p)


def qmatmul(x: torch.Tensor, p: PackedWeight) -> torch.Tensor:
    """x [m, k] float32 @ W^T -> [m, n] float32 (native; callers check `usable` first)."""
    return _native_product("weft_qmatmul_f32", x, p)


def _native_product(name: str, x: torch.Tensor, p: PackedWeight) -> torch.Tensor:
    """y = x @ p^T by the native entry point `name` (the two share a signature)."""
    x = x.contiguous()
    y = torch.empty(x.shape[0], p.n, dtype=torch.float32)
    rc = getattr(cpu_native.lib(), name)(x.data_ptr(), x.shape[0], p.k, p.data.data_ptr(), p.fmt, p.n, y.data_ptr(),
                                         p.n, torch.get_num_threads())
    if rc != 0:
        raise RuntimeError(f"{name} failed (code {rc})")
    return y
