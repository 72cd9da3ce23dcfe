"""The residual shapes decoder layers come in. Each takes the residual stream h [T, hidden] and
returns the updated one; sub-modules are called through .forward (nn.Module.__call__ costs
~4 us a call and no hooks are ever registered)."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from kernels.attention import AttentionMetadata
from kernels.rope import StepRope
from service.models.layers.attention import Attention


@dataclass(slots=True)
class Step:
    """What every layer of one forward pass shares: the rotary rows of the step's positions (one
    per table the model keeps), where the new K/V go, and the batch's attention metadata."""
    ropes: dict[str, StepRope]
    slot_mapping: torch.Tensor
    meta: AttentionMetadata


def attend(attn: Attention, x: torch.Tensor, step: Step, kv: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    return attn.forward(x, step.ropes[attn.rope_key], kv[0], kv[1], step.slot_mapping, step.meta)


class PreNormLayer(nn.Module):
    """h += attn(norm(h)); h += mlp(norm(h)): Llama's shape (Qwen3, Mixtral, the Qwen MoEs).
    `residual_scale` multiplies each branch before it is added (Granite's residual_multiplier)."""

    def __init__(self, self_attn: Attention, mlp: nn.Module, input_layernorm: nn.Module,
                 post_attention_layernorm: nn.Module, residual_scale: float | None = None) -> None:
        super().__init__()
        self.self_attn = self_attn
        self.mlp = mlp
        self.input_layernorm = input_layernorm
        self.post_attention_layernorm = post_attention_layernorm
        self.residual_scale = residual_scale

    def forward(self, h: torch.Tensor, step: Step, kv: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        delta = attend(self.self_attn, self.input_layernorm.forward(h), step, kv)
        h = h + (delta if self.residual_scale is None else delta * self.residual_scale)
        delta = self.mlp.forward(self.post_attention_layernorm.forward(h))
        return h + (delta if self.residual_scale is None else delta * self.residual_scale)


class SandwichNormLayer(nn.Module):
    """Each branch normed on the way in and on the way out (Gemma 2 and 3):
    h += post_attn_norm(attn(input_norm(h))); h += post_ff_norm(mlp(pre_ff_norm(h)))."""

    def __init__(self, self_attn: Attention, mlp: nn.Module, input_layernorm: nn.Module,
                 post_attention_layernorm: nn.Module, pre_feedforward_layernorm: nn.Module,
                 post_feedforward_layernorm: nn.Module) -> None:
        super().__init__()
        self.self_attn = self_attn
        self.mlp = mlp
        self.input_layernorm = input_layernorm
        self.post_attention_layernorm = post_attention_layernorm
        self.pre_feedforward_layernorm = pre_feedforward_layernorm
        self.post_feedforward_layernorm = post_feedforward_layernorm

    def forward(self, h: torch.Tensor, step: Step, kv: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        delta = attend(self.self_attn, self.input_layernorm.forward(h), step, kv)
        h = h + self.post_attention_layernorm.forward(delta)
        delta = self.mlp.forward(self.pre_feedforward_layernorm.forward(h))
        return h + self.post_feedforward_layernorm.forward(delta)


class PostNormLayer(nn.Module):
    """Branches normed on the way out only (OLMo 2): h += post_attn_norm(attn(h)); h += post_ff_norm(mlp(h))."""

    def __init__(self, self_attn: Attention, mlp: nn.Module, post_attention_layernorm: nn.Module,
                 post_feedforward_layernorm: nn.Module) -> None:
        super().__init__()
        self.self_attn = self_attn
        self.mlp = mlp
        self.post_attention_layernorm = post_attention_layernorm
        self.post_feedforward_layernorm = post_feedforward_layernorm

    def forward(self, h: torch.Tensor, step: Step, kv: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        h = h + self.post_attention_layernorm.forward(attend(self.self_attn, h, step, kv))
        return h + self.post_feedforward_layernorm.forward(self.mlp.forward(h))


class ParallelLayer(nn.Module):
    """Attention and MLP side by side on one norm (Cohere): x = norm(h); h = h + attn(x) + mlp(x)."""

    def __init__(self, self_attn: Attention, mlp: nn.Module, input_layernorm: nn.Module) -> None:
        super().__init__()
        self.self_attn = self_attn
        self.mlp = mlp
        self.input_layernorm = input_layernorm

    def forward(self, h: torch.Tensor, step: Step, kv: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        x = self.input_layernorm.forward(h)
        return h + attend(self.self_attn, x, step, kv) + self.mlp.forward(x)
