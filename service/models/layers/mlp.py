"""Feed-forward blocks: the gated MLP (SwiGLU, GeGLU) with gate and up fused into one matmul, and
the plain two-layer MLP (StarCoder2)."""
from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from kernels import cpu_native
from service.models.layers.linear import AMX_MIN_ROWS, project
from service.models.layers.weights import CheckpointWeights
from service.models.lora import LoRAStep


def _gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x, approximate="tanh")


# transformers' ACT2FN names -> the same functions.
ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "silu": F.silu,
    "swish": F.silu,
    "gelu_pytorch_tanh": _gelu_tanh,
    "gelu": F.gelu,
}


def activation(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    if name not in ACTIVATIONS:
        raise ValueError(f"activation {name!r} is not supported; supported: {sorted(ACTIVATIONS)}")
    return ACTIVATIONS[name]


class GatedMLP(nn.Module):
    """down(act(gate(x)) * up(x)); gate and up are one [2 * inter, hidden] weight."""

    def __init__(self, hidden: int, inter: int, act: str = "silu", bias: bool = False) -> None:
        super().__init__()
        self.inter = inter
        self.act = activation(act)
        self.gate_up_proj = nn.Linear(hidden, 2 * inter, bias=bias)
        self.down_proj = nn.Linear(inter, hidden, bias=bias)
        # Tensor parallel: sums the partial down_proj outputs of the ranks (service/models/parallel.py).
        self.reduce: Callable[[torch.Tensor], None] | None = None

    def forward(self, x: torch.Tensor, lora: LoRAStep | None = None, layer: int = 0,
                tile_rows: int = AMX_MIN_ROWS) -> torch.Tensor:
        gate_up = project(x, self.gate_up_proj, tile_rows)
        if lora is not None:
            lora.add_(gate_up, x, layer, "gate_up")
        if self.act is F.silu and cpu_native.usable(gate_up):
            act = cpu_native.silu_mul(gate_up, self.inter)   # prefill rows: one pass instead of three
        else:
            gate, up = gate_up.split(self.inter, dim=-1)
            act = self.act(gate) * up
        out = project(act, self.down_proj, tile_rows)
        if lora is not None:
            lora.add_(out, act, layer, "down")
        if self.reduce is not None:
            self.reduce(out)
        return out

    def load_weights(self, w: CheckpointWeights, prefix: str, names: tuple[str, str, str] = (
            "gate_proj", "up_proj", "down_proj")) -> None:
        """From separate gate/up/down tensors named prefix + name (+ .weight / .bias)."""
        gate, up, down = (prefix + n for n in names)
        w.put(self.gate_up_proj.weight, w.cat([gate + ".weight", up + ".weight"]), gate + "+up.weight")
        w.put_named(self.down_proj.weight, down + ".weight")
        if self.gate_up_proj.bias is not None:
            w.put(self.gate_up_proj.bias, w.cat([gate + ".bias", up + ".bias"]), gate + "+up.bias")
            w.put_named(self.down_proj.bias, down + ".bias")


class MLP(nn.Module):
    """down(act(up(x))), biases optional."""

    def __init__(self, hidden: int, inter: int, act: str, bias: bool) -> None:
        super().__init__()
        self.act = activation(act)
        self.up_proj = nn.Linear(hidden, inter, bias=bias)
        self.down_proj = nn.Linear(inter, hidden, bias=bias)
        self.reduce: Callable[[torch.Tensor], None] | None = None   # as GatedMLP's

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.linear(self.act(F.linear(x, self.up_proj.weight, self.up_proj.bias)),
                       self.down_proj.weight, self.down_proj.bias)
        if self.reduce is not None:
            self.reduce(out)
        return out

    def load_weights(self, w: CheckpointWeights, prefix: str, names: tuple[str, str] = ("up_proj", "down_proj")) -> None:
        for mod, name in zip((self.up_proj, self.down_proj), names):
            w.put_named(mod.weight, prefix + name + ".weight")
            if mod.bias is not None:
                w.put_named(mod.bias, prefix + name + ".bias")
