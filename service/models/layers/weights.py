"""Checkpoint tensors by their `transformers` names, put into our (often fused) parameters with
every name and shape checked: a missing, misshapen or left-over tensor is a ModelLoadError that
names it, never a silently wrong model."""
from __future__ import annotations

import torch
from torch import nn

from common.errors import ModelLoadError


class CheckpointWeights:
    """Hands out checkpoint tensors and remembers which were asked for and which were missing."""

    def __init__(self, weights: dict[str, torch.Tensor], ignorable: tuple[str, ...] = (),
                 ignorable_prefixes: tuple[str, ...] = ()) -> None:
        self.weights = weights
        self.ignorable = ignorable     # name suffixes that may be present unused (a tied lm_head)
        self.ignorable_prefixes = ignorable_prefixes   # name prefixes likewise (extra prediction layers)
        self.used: set[str] = set()
        self.missing: list[str] = []
        self.bad_shapes: list[str] = []

    def take(self, name: str) -> torch.Tensor | None:
        tensor = self.weights.get(name)
        if tensor is None:
            self.missing.append(name)
        else:
            self.used.add(name)
        return tensor

    def cat(self, names: list[str], dim: int = 0) -> torch.Tensor | None:
        """The named tensors concatenated (a fused projection), or None if any is missing."""
        parts = [self.take(n) for n in names]
        if any(p is None for p in parts):
            return None
        return torch.cat(parts, dim=dim)

    def take_shaped(self, name: str, shape: tuple[int, ...]) -> torch.Tensor | None:
        """The named tensor if it has `shape` (else None, and `finish` reports it)."""
        tensor = self.take(name)
        if tensor is not None and tuple(tensor.shape) != tuple(shape):
            self.bad_shapes.append(f"{name}: shape {tuple(tensor.shape)}, the config implies {tuple(shape)}")
            return None
        return tensor

    def stack(self, names: list[str]) -> torch.Tensor | None:
        """The named tensors stacked on a new first dimension (one expert each)."""
        parts = [self.take(n) for n in names]
        if any(p is None for p in parts):
            return None
        return torch.stack(parts)

    def put(self, param: nn.Parameter | None, tensor: torch.Tensor | None, what: str) -> None:
        """Copy `tensor` into `param` (skipped when the tensor is missing: `finish` reports it)."""
        if tensor is None or param is None:
            return
        if param.shape != tensor.shape:
            self.bad_shapes.append(f"{what}: shape {tuple(tensor.shape)}, the config implies {tuple(param.shape)}")
            return
        param.data.copy_(tensor)

    def put_named(self, param: nn.Parameter | None, name: str) -> None:
        if param is not None:
            self.put(param, self.take(name), name)

    def put_norm(self, norm: nn.Module, prefix: str) -> None:
        """A norm's weight (and bias, if it has one) from prefix + .weight / .bias."""
        self.put_named(norm.weight, prefix + ".weight")
        if getattr(norm, "bias", None) is not None:
            self.put_named(norm.bias, prefix + ".bias")

    def finish(self) -> None:
        if self.missing:
            shown = ", ".join(self.missing[:5]) + (f" (and {len(self.missing) - 5} more)" if len(self.missing) > 5 else "")
            raise ModelLoadError(f"weights missing for {len(self.missing)} parameter(s) the config implies: {shown}")
        if self.bad_shapes:
            raise ModelLoadError("; ".join(self.bad_shapes[:5]))
        left = sorted(n for n in self.weights if n not in self.used and not n.endswith(self.ignorable)
                      and not n.startswith(self.ignorable_prefixes))
        if left:
            # A tensor we would not use means a feature we do not compute (a bias, an extra norm).
            shown = ", ".join(left[:5]) + (f" (and {len(left) - 5} more)" if len(left) > 5 else "")
            raise ModelLoadError(f"checkpoint has {len(left)} tensor(s) this model does not use: {shown}")
