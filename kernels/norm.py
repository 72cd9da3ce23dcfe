"""Residual add + RMSNorm: `h += delta` in place (when delta is given), then the norm of h."""
from __future__ import annotations

import torch

from kernels import cpu_native


def add_rms_norm(h: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """h, delta: [T, n]; weight: [n]. Updates h, returns the normalised copy."""
    if (cpu_native.usable(h, weight) and h.is_contiguous() and weight.is_contiguous()
            and (delta is None or (delta.dtype == h.dtype and delta.is_contiguous()))):
        out = torch.empty_like(h)
        cpu_native.lib().weft_add_rms_norm_f32(
            h.data_ptr(), None if delta is None else delta.data_ptr(), weight.data_ptr(), out.data_ptr(),
            h.shape[0], h.shape[1], eps, torch.get_num_threads())
        return out
    if delta is not None:
        h.add_(delta)
    return rms_norm_ref(h, weight, eps)


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Normalise in float32 then scale in the model dtype, as transformers does."""
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)
