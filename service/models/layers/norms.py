"""The normalisations families use, each computed in the order its `transformers` model does
(the order decides the rounding in bfloat16)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kernels.norm import add_rms_norm, rms_norm_ref


class RMSNorm(nn.Module):
    """Llama's: normalise in float32, cast back, then scale by the weight. With
    `scale_in_float32` (OLMo 2) the weight multiplies before the cast back."""

    def __init__(self, dim: int, eps: float, scale_in_float32: bool = False) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps
        self.scale_in_float32 = scale_in_float32

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.scale_in_float32:
            return rms_norm_ref(x, self.weight, self.eps)
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (self.weight.float() * xf).to(x.dtype)

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


class LayerNorm(nn.Module):
    """torch's LayerNorm (weight and optional bias), in the input's dtype (StarCoder2)."""

    def __init__(self, dim: int, eps: float, bias: bool = True) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim)) if bias else None
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, self.weight.shape, self.weight, self.bias, self.eps)


class Float32LayerNorm(nn.Module):
    """Cohere's: mean-centred, no bias, computed in float32 as two explicit means. The weight
    may have a leading heads dimension ([H, D]: a weight per head for the q/k norms)."""

    def __init__(self, shape: int | tuple[int, ...], eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(shape))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        centred = xf - xf.mean(-1, keepdim=True)
        variance = centred.pow(2).mean(-1, keepdim=True)
        return (self.weight.float() * (centred * torch.rsqrt(variance + self.eps))).to(x.dtype)
