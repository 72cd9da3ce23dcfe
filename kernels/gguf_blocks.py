"""GGUF quantised blocks decoded to scales, offsets and integer quants, per 32 weights (per 16 for
Q6_K): what kernels/quant.py repacks into the layouts kernels/csrc/cpu_qmatmul.c reads.

Every type here de-quantises (in gguf-py, so in transformers' loader) to d * q + m per weight with
d * q exact in float32 (an fp16 scale, at most an 8-bit sub-scale and a 6-bit quant: at most 24
significant bits) and one rounding for the offset. So each decodes to one of four layouts with
float32 d and m folded per sub-block and no weight changed:
  Q8_0                 -> "Q8_0": d * q, q int8
  Q4_0, Q4_1, Q4_K     -> "Q4_1": d * q + m, q 0..15 (Q4_0: m = -8 d; Q4_K: d = d * sc, m = -dmin * min)
  Q5_0, Q5_1, Q5_K     -> "Q5_1": d * q + m, q 0..31 (Q5_0: m = -16 d)
  Q6_K                 -> "Q6_K": d * q, q -32..31, a scale per 16 weights
Byte layouts as ggml's block_* structs (gguf-py's quants.py reads them the same way). The load
checks every packed tensor against the float32 weight anyway (quant.equals_weight).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

LAYOUT = {"Q8_0": "Q8_0", "Q4_0": "Q4_1", "Q4_1": "Q4_1", "Q4_K": "Q4_1", "Q5_0": "Q5_1", "Q5_1": "Q5_1",
          "Q5_K": "Q5_1", "Q6_K": "Q6_K"}
# GGUF type -> (bytes per block, weights per block)
BLOCK_BYTES = {"Q8_0": (34, 32), "Q4_0": (18, 32), "Q4_1": (20, 32), "Q5_0": (22, 32), "Q5_1": (24, 32),
               "Q4_K": (144, 256), "Q5_K": (176, 256), "Q6_K": (210, 256)}


@dataclass(frozen=True)
class Decoded:
    """A tensor's blocks with the quants already in its layout's bytes, per 32 weights:
    d: float32 [n, k / 32] ([n, k / 16] for Q6_K); m: float32 [n, k / 32] or None;
    qh: uint8 [n, k / 32, 4] (Q5_1: the fifth bits, little-endian) or None;
    qs: uint8 [n, k / 32, 16] (Q4_1, Q5_1: weights i and 16 + i in the low / high nibble of
    byte i) or [n, k / 32, 32] (Q8_0, Q6_K: int8 bytes).
    The legacy types' quant bytes are already so (copied); the K-quants' are reshuffled."""

    layout: str
    d: torch.Tensor
    m: torch.Tensor | None
    qh: torch.Tensor | None
    qs: torch.Tensor


def decode(rows: torch.Tensor, gguf_type: str, k: int) -> Decoded:
    """uint8 [n, k / weights per block * block bytes] -> the blocks' scales, offsets and quants."""
    size, per = BLOCK_BYTES[gguf_type]
    if k % per or rows.dim() != 2 or rows.shape[1] != k // per * size:
        raise ValueError(f"{gguf_type}: rows of shape {tuple(rows.shape)} are not whole blocks of {k} weights")
    b = rows.reshape(rows.shape[0], k // per, size)
    n, nb = rows.shape[0], k // 32
    if gguf_type == "Q8_0":
        return Decoded("Q8_0", _fp16(b, 0), None, None, b[..., 2:])
    if gguf_type in ("Q4_0", "Q4_1"):
        d = _fp16(b, 0)
        m, at = (-8 * d, 2) if gguf_type == "Q4_0" else (_fp16(b, 2), 4)
        return Decoded("Q4_1", d, m, None, b[..., at:])
    if gguf_type in ("Q5_0", "Q5_1"):
        d = _fp16(b, 0)
        m, at = (-16 * d, 2) if gguf_type == "Q5_0" else (_fp16(b, 2), 4)
        return Decoded("Q5_1", d, m, b[..., at:at + 4], b[..., at + 4:])
    if gguf_type in ("Q4_K", "Q5_K"):
        sc, mins = _scales_mins(b[..., 4:16])
        d = (_fp16(b, 0)[..., None] * sc).reshape(n, nb)
        m = (-(_fp16(b, 2)[..., None] * mins)).reshape(n, nb)
        if gguf_type == "Q4_K":
            return Decoded("Q4_1", d, m, None, _nibble_pairs(_nibbles_k(b[..., 16:])).reshape(n, nb, 16))
        # qh byte i: bit j is the fifth bit of weight i of sub-block j; as bytes of a little-endian
        # uint32 per sub-block: byte c, bit t = weight 8 c + t = bit j of qh byte 8 c + t.
        fifth = (b[..., 16:48].reshape(n, -1, 1, 4, 8) >> torch.arange(8, dtype=torch.uint8).reshape(8, 1, 1)) & 1
        qh = (fifth << torch.arange(8, dtype=torch.uint8)).sum(-1, dtype=torch.uint8)
        return Decoded("Q5_1", d, m, qh.reshape(n, nb, 4), _nibble_pairs(_nibbles_k(b[..., 48:])).reshape(n, nb, 16))
    if gguf_type == "Q6_K":
        ql, qh = b[..., :128].reshape(n, -1, 2, 64), b[..., 128:192].reshape(n, -1, 2, 1, 32)
        low = torch.cat([ql & 15, ql >> 4], dim=-1)   # [.., half, 128]: weights i and 64 + i share byte i
        high = (qh >> torch.tensor([0, 2, 4, 6], dtype=torch.uint8).reshape(4, 1)) & 3   # weight 32 s + i: bits 2s
        q = (low | (high.reshape(n, -1, 2, 128) << 4)) - 32   # wraps to the int8 bytes of q - 32
        d = _fp16(b, 208)[..., None] * b[..., 192:208].view(torch.int8).float()
        return Decoded("Q6_K", d.reshape(n, -1), None, None, q.reshape(n, nb, 32))
    raise ValueError(f"no block decoder for GGUF type {gguf_type}")


def _nibble_pairs(v: torch.Tensor) -> torch.Tensor:
    """[.., 32] values 0..15 -> [.., 16] bytes: weights i and 16 + i in the low / high nibble of byte i."""
    return v[..., :16] | (v[..., 16:] << 4)


def _fp16(b: torch.Tensor, at: int) -> torch.Tensor:
    """The fp16 at byte `at` of each block, as float32 [n, blocks]."""
    return b[..., at:at + 2].contiguous().view(torch.float16)[..., 0].float()


def _nibbles_k(qs: torch.Tensor) -> torch.Tensor:
    """[.., 128] bytes -> [.., 8, 32]: sub-blocks 2c and 2c + 1 share bytes 32c..32c+31."""
    qs = qs.reshape(*qs.shape[:-1], 4, 1, 32)
    return torch.cat([qs & 15, qs >> 4], dim=-2).reshape(*qs.shape[:-3], 8, 32)


def _scales_mins(s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The 12 bytes of 6-bit scales and mins of Q4_K / Q5_K -> float32 [.., 8] each: those of
    sub-blocks 0..3 are the low 6 bits of bytes 0..3 / 4..7; those of 4..7 have their low 4 bits
    in bytes 8..11 and their top 2 bits in the top bits of bytes 0..3 / 4..7."""
    d, m, md = s[..., 0:4], s[..., 4:8], s[..., 8:12]
    sc = torch.cat([d & 63, (md & 15) | ((d >> 2) & 48)], dim=-1)
    mins = torch.cat([m & 63, (md >> 4) | ((m >> 2) & 48)], dim=-1)
    return sc.float(), mins.float()


# Where each block type keeps its fp16 scales (and offsets / super-mins), by byte offset.
_FP16_AT = {"Q8_0": (0,), "Q4_0": (0,), "Q4_1": (0, 2), "Q5_0": (0,), "Q5_1": (0, 2), "Q4_K": (0, 2), "Q5_K": (0, 2),
            "Q6_K": (208,)}


def random_rows(gguf_type: str, n: int, k: int, gen: torch.Generator) -> torch.Tensor:
    """Valid GGUF rows (uint8 [n, bytes per row]) of random quants and sub-block scales with
    small, sign-mixed fp16 scales (offsets, super-mins): kernel tests and benches, whose results
    and cost do not depend on the weights being a trained model's."""
    size, per = BLOCK_BYTES[gguf_type]
    nb = k // per
    data = torch.randint(0, 256, (n, nb, size), dtype=torch.uint8, generator=gen)
    for at in _FP16_AT[gguf_type]:
        scales = (torch.rand(n, nb, 1, generator=gen) * 0.02 - 0.01).half()
        data[..., at:at + 2] = scales.view(torch.uint8)
    return data.reshape(n, nb * size).contiguous()
