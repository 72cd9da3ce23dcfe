"""A small K-quant encoder (Q4_K, Q5_K, Q6_K) for writing test GGUFs: gguf-py only de-quantises
these types, and llama.cpp's quantiser is not installed.

Any valid block encoding will do for the tests (they compare Weft against transformers on the
de-quantised weights, whatever those are), so this is a plain min/max quantiser, not llama.cpp's
error-minimising search. What it must honour is the format: 256-weight super-blocks, each with
an fp16 super-scale (and fp16 super-min for Q4_K / Q5_K) and per-sub-block scales (and mins)
quantised to 6 bits (Q4_K / Q5_K, sub-blocks of 32) or 8 signed bits (Q6_K, sub-blocks of 16).
Byte layouts as ggml's block_q4_K / block_q5_K / block_q6_K (gguf-py's `dequantize_blocks` reads
them the same way); tests/test_kquants.py checks the round trip through gguf-py.

Scales are rounded *up* (super-scale to fp16, sub-block scales to 6 bits) so every weight's
quant lands inside its range: the error of a weight is at most half its sub-block's step.
"""
from __future__ import annotations

import re
from collections.abc import Callable

import numpy as np

QK_K = 256
BLOCK_BYTES = {"Q4_K": 144, "Q5_K": 176, "Q6_K": 210}


def quantize(data: np.ndarray, qtype: str) -> np.ndarray:
    """float32 [..., k] (k a multiple of 256) -> uint8 [..., k / 256 * block bytes], as gguf-py's
    `quants.quantize` returns for the types it implements."""
    x = np.asarray(data, dtype=np.float32)
    if x.shape[-1] % QK_K:
        raise ValueError(f"{qtype}: rows of {x.shape[-1]} are not whole {QK_K}-weight super-blocks")
    blocks = x.reshape(-1, QK_K)
    encode = {"Q4_K": _q4_k, "Q5_K": _q5_k, "Q6_K": _q6_k}[qtype]
    return encode(blocks).reshape(*x.shape[:-1], x.shape[-1] // QK_K * BLOCK_BYTES[qtype])


def _fp16_up(v: np.ndarray) -> np.ndarray:
    """The smallest fp16 >= v (v >= 0), as float32."""
    h = v.astype(np.float16)
    low = h.astype(np.float32) < v
    h[low] = np.nextafter(h[low], np.float16(np.inf))
    return h


def _super_scale(per_sub: np.ndarray, top: int) -> tuple[np.ndarray, np.ndarray]:
    """fp16 super-scale d [n, 1] and integer sub-scales [n, subs] in 0..top with d * sub >= per_sub."""
    d = _fp16_up(per_sub.max(axis=1, keepdims=True) / top)
    d32 = d.astype(np.float32)
    with np.errstate(divide="ignore", invalid="ignore"):
        sub = np.where(d32 > 0, np.ceil(per_sub / d32), 0)
    return d, np.clip(sub, 0, top).astype(np.uint8)


def _divide(x: np.ndarray, step: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(step > 0, x / step, 0)


def _scales_and_mins(blocks: np.ndarray, levels: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Q4_K / Q5_K: (header [n, 16] = fp16 d, fp16 dmin, 12 bytes of 6-bit scales and mins;
    quants [n, 8, 32] in 0..levels)."""
    sub = blocks.reshape(-1, 8, 32)
    neg_min = np.maximum(-sub.min(axis=2), 0)            # the format subtracts dmin * m >= 0
    dmin, m = _super_scale(neg_min, 63)
    eff_min = (dmin.astype(np.float32) * m)[..., None]
    span = np.maximum(sub.max(axis=2) + eff_min[..., 0], 0) / levels
    d, sc = _super_scale(span, 63)
    step = (d.astype(np.float32) * sc)[..., None]
    q = np.clip(np.rint(_divide(sub + eff_min, step)), 0, levels).astype(np.uint8)
    # 12 bytes: scales / mins 0..3 in the low 6 bits of bytes 0..3 / 4..7; those of 4..7 have
    # their low nibbles in bytes 8..11 and their top 2 bits in the top bits of bytes 0..7.
    packed = np.concatenate([
        (sc[:, :4] & 0x3F) | ((sc[:, 4:] >> 4) << 6),
        (m[:, :4] & 0x3F) | ((m[:, 4:] >> 4) << 6),
        (sc[:, 4:] & 0x0F) | ((m[:, 4:] & 0x0F) << 4),
    ], axis=1).astype(np.uint8)
    header = np.concatenate([d.view(np.uint8), dmin.view(np.uint8), packed], axis=1)
    return header, q


def _low_nibbles(q: np.ndarray) -> np.ndarray:
    """[n, 8, 32] -> 128 bytes: sub-blocks 2c and 2c + 1 share bytes 32c..32c+31 (low, high nibble)."""
    low = q & 0x0F
    return (low[:, 0::2] | (low[:, 1::2] << 4)).reshape(-1, 128)


def _q4_k(blocks: np.ndarray) -> np.ndarray:
    header, q = _scales_and_mins(blocks, 15)
    return np.concatenate([header, _low_nibbles(q)], axis=1)


def _q5_k(blocks: np.ndarray) -> np.ndarray:
    header, q = _scales_and_mins(blocks, 31)
    # qh: byte i holds the fifth bit of weight i of sub-block j in its bit j.
    qh = ((q >> 4) << np.arange(8, dtype=np.uint8)[None, :, None]).sum(axis=1, dtype=np.uint8)
    return np.concatenate([header, qh, _low_nibbles(q)], axis=1)


def _q6_k(blocks: np.ndarray) -> np.ndarray:
    sub = blocks.reshape(-1, 16, 16)
    d, sc = _super_scale(np.abs(sub).max(axis=2) / 31, 127)   # int8 scales, used 0..127 here
    step = (d.astype(np.float32) * sc)[..., None]
    q = (np.clip(np.rint(_divide(sub, step)), -32, 31) + 32).astype(np.uint8).reshape(-1, 2, 128)
    # Each half of 128 weights: ql byte i has weights i (low nibble) and 64 + i (high); qh byte
    # i has the top 2 bits of weights i, 32 + i, 64 + i, 96 + i.
    ql = (q[:, :, :64] & 0x0F) | ((q[:, :, 64:] & 0x0F) << 4)
    top = (q >> 4).reshape(-1, 2, 4, 32) << (2 * np.arange(4, dtype=np.uint8))[None, None, :, None]
    qh = top.sum(axis=2, dtype=np.uint8)
    return np.concatenate([ql.reshape(-1, 128), qh.reshape(-1, 64), sc.view(np.uint8), d.view(np.uint8)], axis=1)


# llama.cpp keeps a K-quant's tensor whose rows are not whole super-blocks in this type instead
# (SmolLM2's hidden size, 576, is not a multiple of 256: all but its ffn_down fall back).
FALLBACK = {"Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0"}


def llama_cpp_mix(ftype: str, n_layers: int, tied: bool) -> Callable[[str], str]:
    """The tensor types llama.cpp's quantiser picks for a Llama-family model at `ftype` (Q4_K_M,
    Q5_K_M, Q6_K): the base K-quant, but Q6_K for the output (the token embedding when tied) and,
    in the _M mixes, for attn_v and ffn_down of the layers `use_more_bits` picks (the first and
    last eighth, every third between). The GGUF writer applies FALLBACK by row length."""
    base = {"Q4_K_M": "Q4_K", "Q5_K_M": "Q5_K", "Q6_K": "Q6_K"}[ftype]
    eighth = n_layers // 8

    def more_bits(i: int) -> bool:
        return i < eighth or i >= 7 * n_layers // 8 or (i - eighth) % 3 == 2

    def qtype(name: str) -> str:
        if name == "output.weight" or (tied and name == "token_embd.weight"):
            return "Q6_K"
        m = re.fullmatch(r"blk\.(\d+)\.(attn_v|ffn_down)\.weight", name)
        return "Q6_K" if m and ftype.endswith("_M") and more_bits(int(m[1])) else base

    return qtype
