"""What one forward step takes in and gives back, as the runner sees it.

The runner does not know requests: the engine (and the draft proposer, which runs its own
model) describe each sequence's work as a `SeqInput`, and get back a `StepOutput` whose
`RowLayout` says, once, which logits rows belong to which sequence. Everyone downstream —
guide masks, sampling, speculative verification, a retry without failed rows — reads that
layout instead of recomputing offsets from draft lengths (vLLM's SpecDecodeMetadata).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass(slots=True)
class SeqInput:
    """One sequence's tokens for a step."""
    request_id: str          # names its blocks in the KV manager
    token_ids: list[int]     # fed this step: real tokens, then any draft tokens
    start: int               # position of token_ids[0] (the KV below it is already computed)
    num_logits: int = 0      # logits rows wanted, the last ones: 0 (a mid-prompt chunk), 1, or 1 + k drafts


@dataclass(slots=True)
class RowLayout:
    """Where each sequence's logits rows are: `first[i]`, `count[i]` for sequence i (count 0: none)."""
    first: list[int]
    count: list[int]

    @classmethod
    def packed(cls, counts: Sequence[int]) -> RowLayout:
        """Rows laid out back to back in sequence order."""
        first, at = [], 0
        for c in counts:
            first.append(at)
            at += c
        return cls(first, list(counts))

    @property
    def num_rows(self) -> int:
        return sum(self.count)

    def rows(self, seqs: Sequence[int]) -> list[int]:
        """The row indices of the given sequences, in that order."""
        return [r for i in seqs for r in range(self.first[i], self.first[i] + self.count[i])]


@dataclass(slots=True)
class StepOutput:
    """The logits of one step (float32), with the row layout of the `SeqInput`s that asked."""
    logits: torch.Tensor
    layout: RowLayout

    def gather(self, seqs: Sequence[int]) -> torch.Tensor:
        """The rows of the given sequences, back to back in that order (a copy unless it is all of them)."""
        rows = self.layout.rows(seqs)
        if rows == list(range(self.logits.shape[0])):
            return self.logits
        return self.logits.index_select(0, torch.tensor(rows, dtype=torch.long, device=self.logits.device))
