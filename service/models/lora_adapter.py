"""What every LoRA reader hands over (PEFT directories in service/models/lora.py, llama.cpp's
GGUF in service/models/lora_gguf.py): the modules it found, the base model's shapes it is
checked against, and the one error it raises."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from common.errors import ModelLoadError


class AdapterLoadError(ModelLoadError):
    """An adapter that cannot be served: missing, corrupt, or not what the base model runs."""


@dataclass(frozen=True, slots=True)
class BaseShapes:
    """What a base model's projections look like: the parts of each fused projection."""
    num_layers: int
    hidden: int
    q_size: int
    kv_size: int
    inter: int
    # For GGUF adapters: llama.cpp's q/k row order is per head, and the file names its architecture.
    num_heads: int = 0
    num_kv_heads: int = 0
    family: str = ""        # the base model's config.model_type

    def parts(self, proj: str) -> tuple[int, list[int]]:
        """(input features, output features of each part) of a fused projection."""
        return {"qkv": (self.hidden, [self.q_size, self.kv_size, self.kv_size]), "o": (self.q_size, [self.hidden]),
                "gate_up": (self.hidden, [self.inter, self.inter]), "down": (self.inter, [self.hidden])}[proj]


@dataclass(slots=True)
class AdapterModule:
    """One adapted module as a reader found it, before checking: PEFT's orientation
    (A [r, in], B [out, r]) and the scaling its format prescribes."""
    layer: int
    module: str            # a MODULE_PARTS key: q_proj, ..., down_proj
    a: torch.Tensor
    b: torch.Tensor
    scaling: float
