"""Sparse mixture-of-experts feed-forward: a softmax router picks each token's top-k experts;
the experts run as grouped GEMMs.

The token->expert assignments are sorted by expert, so each expert's rows are contiguous: one
gather of the hidden states, one [n_e, hidden] x [hidden, 2 * inter] and one down GEMM per
expert that received tokens (a loop over experts, never over tokens), one scatter-add back.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from service.models.layers.mlp import GatedMLP, activation
from service.models.layers.weights import CheckpointWeights


def grouped_experts(
    x: torch.Tensor, top_experts: torch.Tensor, top_weights: torch.Tensor,
    gate_up: torch.Tensor, down: torch.Tensor, act, inter: int,
) -> torch.Tensor:
    """sum_k weight[t, k] * expert_{top[t, k]}(x[t]) for every token t.

    x [T, hidden]; top_experts, top_weights [T, k]; gate_up [E, 2 * inter, hidden]; down [E, hidden, inter].
    Each token's terms are added in ascending expert order, as transformers adds them."""
    num_experts, k = gate_up.shape[0], top_experts.shape[1]
    flat = top_experts.reshape(-1)
    order = torch.argsort(flat, stable=True)            # assignments grouped by expert
    counts = torch.bincount(flat, minlength=num_experts).tolist()
    token = order // k                                  # the token of each grouped assignment
    rows = x.index_select(0, token)
    out = torch.empty_like(rows)
    start = 0
    for e, n in enumerate(counts):
        if n == 0:
            continue
        gu = F.linear(rows[start:start + n], gate_up[e])
        g, u = gu.split(inter, dim=-1)
        out[start:start + n] = F.linear(act(g) * u, down[e])
        start += n
    # The routing weight multiplies in its own dtype (float32 for Mixtral), then back to x's.
    out = (out * top_weights.reshape(-1)[order, None]).to(x.dtype)
    return torch.zeros_like(x).index_add_(0, token, out)


class SparseMoE(nn.Module):
    """Router + experts (+ an optional shared expert, optionally sigmoid-gated: Qwen2-MoE).

    `renormalize`: the top-k probabilities are divided by their sum (Mixtral always; the Qwen
    MoEs when norm_topk_prob). `float32_weights`: the routing weights stay float32 when they
    multiply the experts' outputs (Mixtral) instead of being cast to the model dtype first (Qwen)."""

    def __init__(self, hidden: int, inter: int, num_experts: int, top_k: int, *, act: str = "silu",
                 renormalize: bool, float32_weights: bool = False,
                 shared_inter: int | None = None, shared_gate: bool = False) -> None:
        super().__init__()
        self.inter = inter
        self.top_k = top_k
        self.renormalize = renormalize
        self.float32_weights = float32_weights
        self.act = activation(act)
        self.gate = nn.Linear(hidden, num_experts, bias=False)      # the router
        self.experts_gate_up = nn.Parameter(torch.empty(num_experts, 2 * inter, hidden))
        self.experts_down = nn.Parameter(torch.empty(num_experts, hidden, inter))
        self.shared_expert = GatedMLP(hidden, shared_inter, act) if shared_inter else None
        self.shared_expert_gate = nn.Linear(hidden, 1, bias=False) if shared_gate else None
        # Tensor parallel: sums the ranks' partial expert outputs (service/models/parallel.py).
        self.reduce: Callable[[torch.Tensor], None] | None = None

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(top-k expert ids, their weights) [T, k] per token."""
        probs = torch.softmax(F.linear(x, self.gate.weight), dim=-1, dtype=torch.float32)
        weights, experts = torch.topk(probs, self.top_k, dim=-1)
        if self.renormalize:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        if not self.float32_weights:
            weights = weights.to(x.dtype)
        return experts, weights

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        experts, weights = self.route(x)
        out = grouped_experts(x, experts, weights, self.experts_gate_up, self.experts_down, self.act, self.inter)
        if self.shared_expert is not None:
            shared = self.shared_expert.forward(x)
            if self.shared_expert_gate is not None:
                shared = torch.sigmoid(F.linear(x, self.shared_expert_gate.weight)) * shared
            out = out + shared
        if self.reduce is not None:
            self.reduce(out)
        return out

    def load_weights(self, w: CheckpointWeights, prefix: str, expert_names: tuple[str, str, str] = (
            "gate_proj", "up_proj", "down_proj"), shared_name: str = "shared_expert") -> None:
        """Router prefix + gate.weight; expert e's prefix + experts.{e}.{gate,up,down}.weight;
        the shared expert's prefix + shared_name."""
        gate, up, down = expert_names
        n = self.experts_gate_up.shape[0]
        w.put_named(self.gate.weight, prefix + "gate.weight")
        if prefix + "experts.gate_up_proj" in w.weights:
            # transformers' in-memory layout (a GGUF conversion saves its state_dict): the experts
            # already stacked, gate rows before up rows, as ours.
            w.put_named(self.experts_gate_up, prefix + "experts.gate_up_proj")
            w.put_named(self.experts_down, prefix + "experts.down_proj")
        else:
            fused = [w.cat([f"{prefix}experts.{e}.{gate}.weight", f"{prefix}experts.{e}.{up}.weight"])
                     for e in range(n)]
            if all(t is not None for t in fused):
                w.put(self.experts_gate_up, torch.stack(fused), prefix + "experts.*.gate+up")
            w.put(self.experts_down, w.stack([f"{prefix}experts.{e}.{down}.weight" for e in range(n)]),
                  prefix + "experts.*.down")
        if self.shared_expert is not None:
            self.shared_expert.load_weights(w, prefix + shared_name + ".")
        if self.shared_expert_gate is not None:
            w.put_named(self.shared_expert_gate.weight, prefix + "shared_expert_gate.weight")
