"""Batched LoRA: add x @ A[s] @ B[s] to a projection's output, each token with its own adapter
slot s (or none), for the whole step at once (the SGMV idea of Punica / S-LoRA).

The tokens of each slot are gathered into one padded [slots, M, in] tensor, so two batched
matmuls over the stacked adapters serve every adapter of the step, and one index_add puts
the deltas back: a handful of ops per projection whatever the number of adapters, never a
Python loop over requests or adapters. A step whose tokens all share one adapter skips the
gather and scatter. Torch ops on every device (a Triton SGMV would fuse the gather on GPUs).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass(slots=True)
class LoRAPlan:
    """Where each adapted token of a step goes in the padded per-slot layout."""
    num_slots: int
    group_size: int               # M: the most tokens any slot has this step
    single_slot: int | None       # every token uses this slot, in order: no gather or scatter
    gather: torch.Tensor          # [num_slots * M] token feeding each padded row (padding reads token 0)
    valid: torch.Tensor           # [N] the padded rows that hold a real token
    tokens: torch.Tensor          # [N] which token each of them is
    token_slots: torch.Tensor     # [T] int64 on the CPU: each token's slot, -1 for none (the native loop's input)


def make_plan(token_slots: Sequence[int], num_slots: int, device: torch.device) -> LoRAPlan | None:
    """The plan for a step whose token t uses adapter slot token_slots[t] (-1: the base model
    alone). None when no token uses an adapter."""
    by_slot: list[list[int]] = [[] for _ in range(num_slots)]
    for t, s in enumerate(token_slots):
        if s >= 0:
            by_slot[s].append(t)
    used = [s for s in range(num_slots) if by_slot[s]]
    if not used:
        return None
    empty = torch.empty(0, dtype=torch.long, device=device)
    slots_t = torch.tensor(token_slots, dtype=torch.long)
    if len(used) == 1 and len(by_slot[used[0]]) == len(token_slots):
        return LoRAPlan(num_slots, len(token_slots), used[0], empty, empty, empty, slots_t)
    m = max(len(g) for g in by_slot)
    gather, valid, tokens = [0] * (num_slots * m), [], []
    for s, group in enumerate(by_slot):
        for j, t in enumerate(group):
            gather[s * m + j] = t
            valid.append(s * m + j)
            tokens.append(t)
    packed = torch.tensor(gather + valid + tokens, dtype=torch.long).to(device)
    g, v, tk = packed.split([len(gather), len(valid), len(tokens)])
    return LoRAPlan(num_slots, m, None, g, v, tk, slots_t)


def lora_add_(out: torch.Tensor, x: torch.Tensor, a_stack: torch.Tensor, b_stack: torch.Tensor,
              plan: LoRAPlan) -> None:
    """out[t] += x[t] @ a_stack[s] @ b_stack[s] for each adapted token t of slot s, in place.

    out [T, n_out], x [T, n_in], a_stack [S, n_in, R], b_stack [S, R, n_out]; an empty slot's
    padded rows multiply zeros-or-anything and are never scattered back."""
    if plan.single_slot is not None:
        out.addmm_(x @ a_stack[plan.single_slot], b_stack[plan.single_slot])
        return
    s, m = plan.num_slots, plan.group_size
    xg = x.index_select(0, plan.gather).view(s, m, x.shape[1])
    delta = torch.bmm(torch.bmm(xg, a_stack), b_stack).view(s * m, out.shape[1])
    out.index_add_(0, plan.tokens, delta.index_select(0, plan.valid))


def lora_add_ref_(out: torch.Tensor, x: torch.Tensor, a_stack: torch.Tensor, b_stack: torch.Tensor,
                  token_slots: Sequence[int]) -> None:
    """The reference: one token at a time."""
    for t, s in enumerate(token_slots):
        if s >= 0:
            out[t] += x[t] @ a_stack[s] @ b_stack[s]
