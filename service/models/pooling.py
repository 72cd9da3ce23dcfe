"""From per-token hidden states to one vector per sequence, for embeddings: the pooling modes of
sentence-transformers' Pooling module (mean, CLS = first token, last token), then Matryoshka
truncation and L2 normalisation. Shared by the encoder (BERT) and decoder embedders."""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

POOLING_MODES = ("mean", "cls", "last")


def pool(hidden: torch.Tensor, cu_seqlens: Sequence[int], mode: str) -> torch.Tensor:
    """hidden [T, H] of sequences laid back to back (cu_seqlens = [0, ..., T]) -> [B, H] float32."""
    starts, ends = list(cu_seqlens[:-1]), list(cu_seqlens[1:])
    if mode == "cls":
        return hidden[starts].float()
    if mode == "last":
        return hidden[[e - 1 for e in ends]].float()
    if mode != "mean":
        raise ValueError(f"pooling mode must be one of {', '.join(POOLING_MODES)}; got {mode!r}")
    lengths = torch.tensor([e - s for s, e in zip(starts, ends)], device=hidden.device)
    if len(starts) == 1:
        return hidden.float().mean(0, keepdim=True)
    seq = torch.repeat_interleave(torch.arange(len(starts), device=hidden.device), lengths)
    sums = torch.zeros((len(starts), hidden.shape[1]), dtype=torch.float32, device=hidden.device)
    sums.index_add_(0, seq, hidden.float())
    return sums / lengths.unsqueeze(1).to(torch.float32)


def finish(vectors: torch.Tensor, dimensions: int | None, normalize: bool) -> torch.Tensor:
    """Keep the first `dimensions` components (Matryoshka; None keeps all), then L2-normalise each
    row if asked: normalising after the cut keeps a shortened vector a unit vector."""
    if dimensions is not None:
        vectors = vectors[:, :dimensions]
    return F.normalize(vectors, p=2.0, dim=1) if normalize else vectors
