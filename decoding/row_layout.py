"""Which logits rows of a step belong to which sequence (one plain row, 1 + k rows while
verifying a draft, none for a mid-prompt chunk). The engine's StepOutput carries one; the
speculative verifier lays its rows out with the same class instead of its own offsets."""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


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
