"""The counter-based batched sampler's torch reference: logits -> one token per row, reproducible
per request. NOT used by the engine: Weft samples with `decoding.sampling.Sampler` (a torch
pipeline, on CPU and CUDA alike, that this module does not reproduce; kernels/NOTES.md,
"Sampler", says why). This file and its Triton twin (`kernels.triton_sampling`) are kept as a
tested, benchmarked candidate (tests/test_kernels.py, `python -m bench gpu_kernels`).

    sample_tokens_ref(logits[B, V] float32, temperature[B], top_k[B], top_p[B],
                      seeds[B] int64 | None, positions[B] int64 | None) -> tokens[B] int64

Per row (the torch reference below is the definition; the Triton kernel computes the same):
- greedy when temperature < GREEDY_TEMPERATURE (1e-5, as in decoding/sampling.py): argmax of
  the raw logits, first index on ties;
- otherwise z = logits / temperature (float32, correctly rounded division), then
  - top-k (on when 0 < k < V): keep the tokens whose z is >= the k-th largest z (ties kept);
  - top-p (on when p < 1), over the tokens top-k kept, with e_i = exp(z_i - max z) and
    Z = sum e: keep token i when the mass of the tokens strictly above it is < p * Z (the
    smallest prefix of the sorted distribution whose mass reaches p, ties kept);
  - draw by an exponential race (Gumbel-max): the kept token with the largest
    z_i - log(-log(u_i)), where u_i in (0, 1) is a counter-based hash of
    (seed, position, token id). A request that passes the same seed and its own output
    position gets the same token whatever else is in the batch, on either implementation.

Floats are compared through an order-preserving map to int32 (so -0.0 sorts below +0.0).
The two implementations agree bit for bit on the uniforms and on greedy rows; a sampled row
can differ only when its top-p mass lands within float rounding of p * Z, or two race scores
tie within one ulp of `log` (the test checks both conditions row by row).
"""
from __future__ import annotations

import torch

from kernels.sampling_constants import FMIX_C1, FMIX_C2, GREEDY_TEMPERATURE, SEED_SALT, TOKEN_SALT

_M32 = 0xFFFFFFFF


def _defaults(logits: torch.Tensor, seeds: torch.Tensor | None, positions: torch.Tensor | None
              ) -> tuple[torch.Tensor, torch.Tensor]:
    b = logits.shape[0]
    if seeds is None:
        seeds = torch.randint(0, 2**62, (b,), dtype=torch.int64).to(logits.device)
    if positions is None:
        positions = torch.zeros(b, dtype=torch.int64, device=logits.device)
    return seeds, positions


# ---- counter-based uniforms (uint32 arithmetic emulated on int64) --------------------------

def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """(x * c) mod 2**32 for x in [0, 2**32), without overflowing int64."""
    lo = x * (c & 0xFFFF)
    hi = ((x * (c >> 16)) & 0xFFFF) << 16
    return (lo + hi) & _M32


def _fmix32(x: torch.Tensor) -> torch.Tensor:
    x = x ^ (x >> 16)
    x = _mul32(x, FMIX_C1)
    x = x ^ (x >> 13)
    x = _mul32(x, FMIX_C2)
    return x ^ (x >> 16)


def row_hash(seeds: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """[B] int64 in [0, 2**32): the per-(seed, position) key of a row's random stream."""
    s, p = seeds.long(), positions.long()
    h = _fmix32((s & _M32) ^ SEED_SALT)
    h = _fmix32(h ^ ((s >> 32) & _M32))
    h = _fmix32(h ^ (p & _M32))
    return _fmix32(h ^ ((p >> 32) & _M32))


def uniforms_ref(seeds: torch.Tensor, positions: torch.Tensor, vocab: int) -> torch.Tensor:
    """[B, V] float32 in (0, 1): u = ((r >> 9) + 0.5) / 2**23, r = fmix(h ^ fmix(token + salt))."""
    h = row_hash(seeds, positions)
    tok = torch.arange(vocab, dtype=torch.int64, device=seeds.device)
    r = _fmix32(h[:, None] ^ _fmix32((tok + TOKEN_SALT) & _M32)[None, :])
    return ((r >> 9).to(torch.float32) + 0.5) * (1.0 / 2**23)


def order_key(z: torch.Tensor) -> torch.Tensor:
    """Order-preserving float32 -> int32 map (as int64)."""
    bits = z.contiguous().view(torch.int32)
    return torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits).long()


# ---- reference ------------------------------------------------------------------------------

def sample_tokens_ref(
    logits: torch.Tensor,
    temperature: torch.Tensor,
    top_k: torch.Tensor,
    top_p: torch.Tensor,
    seeds: torch.Tensor | None = None,
    positions: torch.Tensor | None = None,
) -> torch.Tensor:
    seeds, positions = _defaults(logits, seeds, positions)
    x = logits.float()
    num_rows, vocab = x.shape
    t = temperature.to(x.device, torch.float32)
    greedy = t < GREEDY_TEMPERATURE
    z = x / torch.where(greedy, torch.ones_like(t), t)[:, None]
    kept = kept_mask_ref(z, top_k, top_p)
    g = -torch.log(-torch.log(uniforms_ref(seeds.to(x.device), positions.to(x.device), vocab)))
    score = torch.where(kept, z + g, torch.full_like(z, float("-inf")))
    tokens = score.argmax(dim=1)
    return torch.where(greedy, x.argmax(dim=1), tokens)


def kept_mask_ref(z: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """[B, V] bool: the tokens top-k then top-p keep (see the module docstring)."""
    num_rows, vocab = z.shape
    key = order_key(z)
    kept = torch.ones_like(z, dtype=torch.bool)
    ks = top_k.tolist()
    ps = top_p.to(torch.float32).cpu()
    for r in range(num_rows):
        k, p = int(ks[r]), ps[r]
        if not (0 < k < vocab) and not p < 1.0:
            continue
        order = torch.argsort(key[r], descending=True, stable=True)
        skey = key[r][order]
        thr = skey[-1]
        if 0 < k < vocab:
            thr = skey[k - 1]
        if p < 1.0:
            zs = z[r][order]
            valid = skey >= thr
            e = torch.where(valid, torch.exp(zs - zs[0]), torch.zeros_like(zs))
            total = e.sum()
            # Mass strictly before each sorted position (at a tie group's first member: the
            # mass strictly above the group).
            above = torch.cat([e.new_zeros(1), torch.cumsum(e, 0)[:-1]])
            ok = valid & (above < p.to(z.device) * total)
            thr = skey[int(ok.nonzero().max())]
        kept[r] = key[r] >= thr
    return kept
