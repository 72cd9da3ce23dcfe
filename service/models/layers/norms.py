"""The normalisations families use, each computed in the order its `transformers` model does
(the order decides the rounding in bfloat16)."""
from __future__ import annotations

import torch
from torch import nn

from kernels.norm import add_rms_norm, rms_norm_ref


class RMSNorm(nn.Module):
    """Llama's: normalise in float32, cast back, then scale by the weight."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm_ref(x, self.weight, self.eps)

    def add_forward(self, h: torch.Tensor, delta: torch.Tensor | None) -> torch.Tensor:
        """h += delta (the residual, in place), then the norm of h: one native call on CPU."""
        return add_rms_norm(h, delta, self.weight, self.eps)


class OffsetRMSNorm(nn.Module):
    """Gemma's: the checkpoint stores w - 1 (zero-centred), the scale is (1 + w); everything in
    float32 and one cast at the end."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (xf * (1.0 + self.weight.float())).to(x.dtype)
