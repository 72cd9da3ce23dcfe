"""Megatron-style tensor parallelism over a built model: which slice of each weight a rank keeps,
and where the partial results are summed.

A rank keeps its share of the attention heads (q, and k/v: its share of the KV heads, or the one
KV head its q heads read when there are fewer KV heads than ranks — replicated then), its share
of every MLP's intermediate columns (each expert's too, for the MoEs), and its share of the
vocabulary (embedding rows and lm_head rows, padded to equal shares). The projections that read
a rank's slice — attention's o_proj, the MLPs' down_proj — give partial sums, added across ranks
by one all-reduce after each block; a bias on such a projection is kept by rank 0 alone, so it is
added once. Norms, rotary tables and routers stay whole on every rank. The embedding looks up the
ids of its vocabulary share (zeros for the others) and is all-reduced too; logits stay sharded
here and are gathered by the engine, which owns the process group.

The models layer knows no process group: `Parallel` is the little it needs (rank, world size,
an in-place sum), and the engine's group provides it."""
from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from common.errors import ModelLoadError
from service.models.layers.attention import Attention
from service.models.layers.mla import LatentAttention
from service.models.layers.mlp import MLP, GatedMLP
from service.models.layers.moe import SparseMoE


class Parallel(Protocol):
    rank: int
    world: int

    def all_reduce_(self, t: torch.Tensor) -> None:
        """Sum `t` over the ranks, in place."""


def split(n: int, world: int, what: str) -> int:
    """n / world, or a ModelLoadError naming what cannot be split evenly."""
    if n % world:
        raise ModelLoadError(f"tensor parallelism: {what} ({n}) is not divisible by --tensor-parallel-size {world}")
    return n // world


class VocabParallelEmbedding(nn.Module):
    """The embedding rows of one vocabulary share [start, start + rows); ids outside it give zeros,
    so the all-reduce of every rank's lookup is the whole lookup."""

    def __init__(self, weight: torch.Tensor, start: int, vocab: int, par: Parallel) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.start = start
        self.end = min(start + weight.shape[0], vocab)
        self.par = par

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        inside = (ids >= self.start) & (ids < self.end)
        local = torch.where(inside, ids - self.start, torch.zeros_like(ids))
        h = F.embedding(local, self.weight) * inside.unsqueeze(-1).to(self.weight.dtype)
        self.par.all_reduce_(h)
        return h


def vocab_share(vocab: int, world: int) -> int:
    """Rows per rank: the vocabulary padded up to a multiple of the world size."""
    return -(-vocab // world)


def _rows(w: torch.Tensor, start: int, rows: int) -> torch.Tensor:
    """Rows [start, start + rows) of w, zero-padded past its end (the last vocabulary share)."""
    part = w[start:start + rows]
    if part.shape[0] < rows:
        part = torch.cat([part, part.new_zeros(rows - part.shape[0], *part.shape[1:])])
    return part.contiguous()


def _param(t: torch.Tensor) -> nn.Parameter:
    return nn.Parameter(t.contiguous(), requires_grad=False)


def _kv_heads(num_kv: int, num_heads: int, par: Parallel) -> tuple[int, int]:
    """(first KV head, how many) this rank keeps."""
    if num_kv % par.world == 0:
        n = num_kv // par.world
        return par.rank * n, n
    if par.world % num_kv == 0 and num_heads % par.world == 0:
        # Fewer KV heads than ranks: each is replicated on world / num_kv ranks, and a rank's q
        # heads (a contiguous 1/world of them) all read the same one.
        return par.rank // (par.world // num_kv), 1
    raise ModelLoadError(f"tensor parallelism: {num_kv} KV heads cannot be shared by {par.world} ranks "
                         "(one must divide the other)")


def shard_attention(attn: Attention, par: Parallel) -> None:
    if attn.q_norm is not None and not attn.qk_norm_per_head:
        raise ModelLoadError("tensor parallelism: q/k norms over all heads together (OLMo 2) are not supported")
    d, h = attn.head_dim, split(attn.num_heads, par.world, "attention heads")
    q0 = par.rank * h
    k0, hk = _kv_heads(attn.num_kv_heads, attn.num_heads, par)
    q_rows = slice(q0 * d, (q0 + h) * d)
    k_rows = slice(attn.q_size + k0 * d, attn.q_size + (k0 + hk) * d)
    v_rows = slice(attn.q_size + attn.kv_size + k0 * d, attn.q_size + attn.kv_size + (k0 + hk) * d)

    def qkv(t: torch.Tensor) -> torch.Tensor:
        return torch.cat([t[q_rows], t[k_rows], t[v_rows]])

    attn.qkv_proj.weight = _param(qkv(attn.qkv_proj.weight.data))
    if attn.qkv_proj.bias is not None:
        attn.qkv_proj.bias = _param(qkv(attn.qkv_proj.bias.data))
    attn.qkv_proj.out_features = attn.qkv_proj.weight.shape[0]
    attn.o_proj.weight = _param(attn.o_proj.weight.data[:, q_rows])
    attn.o_proj.in_features = h * d
    if attn.o_proj.bias is not None and par.rank:
        attn.o_proj.bias = _param(torch.zeros_like(attn.o_proj.bias.data))
    for norm, first, n in ((attn.q_norm, q0, h), (attn.k_norm, k0, hk)):
        if norm is not None and norm.weight.dim() == 2:   # a weight per head (Cohere)
            norm.weight = _param(norm.weight.data[first:first + n])
    attn.num_heads, attn.num_kv_heads = h, hk
    attn.q_size, attn.kv_size = h * d, hk * d
    attn.reduce = par.all_reduce_


def _gate_up_rows(w: torch.Tensor, inter: int, i0: int, n: int) -> torch.Tensor:
    """Rows of a fused [gate; up] weight (dim -2) for intermediate columns [i0, i0 + n)."""
    return torch.cat([w[..., i0:i0 + n, :], w[..., inter + i0:inter + i0 + n, :]], dim=-2)


def shard_gated_mlp(mlp: GatedMLP, par: Parallel, reduce: bool = True) -> None:
    n = split(mlp.inter, par.world, "intermediate size")
    i0 = par.rank * n
    mlp.gate_up_proj.weight = _param(_gate_up_rows(mlp.gate_up_proj.weight.data, mlp.inter, i0, n))
    if mlp.gate_up_proj.bias is not None:
        b = mlp.gate_up_proj.bias.data
        mlp.gate_up_proj.bias = _param(torch.cat([b[i0:i0 + n], b[mlp.inter + i0:mlp.inter + i0 + n]]))
    mlp.gate_up_proj.out_features = 2 * n
    mlp.down_proj.weight = _param(mlp.down_proj.weight.data[:, i0:i0 + n])
    mlp.down_proj.in_features = n
    if mlp.down_proj.bias is not None and par.rank:
        mlp.down_proj.bias = _param(torch.zeros_like(mlp.down_proj.bias.data))
    mlp.inter = n
    mlp.reduce = par.all_reduce_ if reduce else None


def shard_mlp(mlp: MLP, par: Parallel) -> None:
    n = split(mlp.up_proj.out_features, par.world, "intermediate size")
    cols = slice(par.rank * n, (par.rank + 1) * n)
    mlp.up_proj.weight = _param(mlp.up_proj.weight.data[cols])
    if mlp.up_proj.bias is not None:
        mlp.up_proj.bias = _param(mlp.up_proj.bias.data[cols])
    mlp.up_proj.out_features = n
    mlp.down_proj.weight = _param(mlp.down_proj.weight.data[:, cols])
    mlp.down_proj.in_features = n
    if mlp.down_proj.bias is not None and par.rank:
        mlp.down_proj.bias = _param(torch.zeros_like(mlp.down_proj.bias.data))
    mlp.reduce = par.all_reduce_


def shard_moe(moe: SparseMoE, par: Parallel) -> None:
    """Every expert keeps its share of intermediate columns (the router stays whole): the sum of
    the routed experts and the shared expert is then partial, and reduced once."""
    n = split(moe.inter, par.world, "expert intermediate size")
    i0 = par.rank * n
    moe.experts_gate_up = _param(_gate_up_rows(moe.experts_gate_up.data, moe.inter, i0, n))
    moe.experts_down = _param(moe.experts_down.data[..., i0:i0 + n])
    moe.inter = n
    if moe.shared_expert is not None:
        shard_gated_mlp(moe.shared_expert, par, reduce=False)
    moe.reduce = par.all_reduce_


def shard_model(model: nn.Module, par: Parallel) -> None:
    """Cut a built model (weights loaded) down to this rank's shard, in place."""
    if par.world == 1:
        return
    if getattr(model, "lm_head_packed", None) is not None:
        raise ModelLoadError("tensor parallelism: GGUF packed weights are not sharded (load before packing)")
    for mod in model.modules():
        if isinstance(mod, LatentAttention):
            raise ModelLoadError("tensor parallelism: multi-head latent attention (DeepSeek) is not supported")
    moes = [m for m in model.modules() if isinstance(m, SparseMoE)]
    shared = {id(m.shared_expert) for m in moes if m.shared_expert is not None}
    for mod in list(model.modules()):
        if isinstance(mod, Attention):
            shard_attention(mod, par)
        elif isinstance(mod, SparseMoE):
            shard_moe(mod, par)
        elif isinstance(mod, GatedMLP) and id(mod) not in shared:
            shard_gated_mlp(mod, par)
        elif isinstance(mod, MLP):
            shard_mlp(mod, par)
    vocab = int(model.config.vocab_size)
    rows = vocab_share(vocab, par.world)
    start = par.rank * rows
    embedding = model.embed_tokens.weight.data
    model.embed_tokens = VocabParallelEmbedding(_rows(embedding, start, rows), start, vocab, par)
    if model.lm_head is not None:
        model.lm_head.weight = _param(_rows(model.lm_head.weight.data, start, rows))
        model.lm_head.out_features = rows
    # The KV cache the runner allocates holds this rank's KV heads only.
    attn = next((m for m in model.modules() if isinstance(m, Attention)), None)
    if attn is not None:
        model.num_kv_heads = attn.num_kv_heads
    # The native one-C-call loop has no all-reduce between layers.
    if hasattr(model, "native"):
        model.native = None
