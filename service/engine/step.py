"""What one forward step takes in and gives back, as the runner sees it.

The runner does not know requests: the engine (and the draft proposer, which runs its own
model) describe each sequence's work as a `SeqInput`, and get back a `StepOutput` whose
`RowLayout` says, once, which logits rows belong to which sequence. Everyone downstream —
guide masks, sampling, speculative verification, a retry without failed rows — reads that
layout instead of recomputing offsets from draft lengths (vLLM's SpecDecodeMetadata).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from decoding.row_layout import RowLayout

__all__ = ["RowLayout", "SeqInput", "StepOutput"]


@dataclass(slots=True)
class SeqInput:
    """One sequence's tokens for a step."""
    request_id: str          # names its blocks in the KV manager
    token_ids: list[int]     # fed this step: real tokens, then any draft tokens
    start: int               # position of token_ids[0] (the KV below it is already computed)
    num_logits: int = 0      # logits rows wanted, the last ones: 0 (a mid-prompt chunk), 1, or 1 + k drafts
    lora_slot: int = -1      # the LoRA stacks' slot its tokens use (-1: the base model alone)
    want_hidden: bool = False   # return this sequence's final hidden states (embedding requests pool them)


@dataclass(slots=True)
class StepOutput:
    """The logits of one step (float32), with the row layout of the `SeqInput`s that asked."""
    logits: torch.Tensor
    layout: RowLayout
    # Sequence index -> its rows of the last hidden states (after the final norm), for the
    # sequences with want_hidden.
    hidden: dict[int, torch.Tensor] = field(default_factory=dict)

    def gather(self, seqs: Sequence[int]) -> torch.Tensor:
        """The rows of the given sequences, back to back in that order (a copy unless it is all of them)."""
        rows = self.layout.rows(seqs)
        if rows == list(range(self.logits.shape[0])):
            return self.logits
        return self.logits.index_select(0, torch.tensor(rows, dtype=torch.long, device=self.logits.device))
