"""The one interface every guided-decoding backend implements.

A backend compiles a `GuidedSpec` once into a `CompiledGrammar` (immutable, cached and shared);
each generated sequence gets its own `Guide` from `new_guide(params)`, which tracks where that
sequence is in the grammar. Backends know nothing of token budgets: `GuideCompiler` hands out
each grammar wrapped (`budget.BudgetGrammar`) so that its guides, knowing the request's
max_tokens, close the output before the budget runs out.

Bitmask layout (llguidance's and xgrammar's, and `kernels.mask.apply_token_bitmask_`'s):
token 32*w + j is bit j of int32 word w; 1 = allowed. A row must cover the model's whole
vocabulary; ids the tokenizer does not know (padding rows of the embedding) are never allowed.

EOS: a guide allows the engine's EOS ids exactly when the text so far is a complete match
(`is_complete()`), and only then.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING

import numpy as np
import torch

if TYPE_CHECKING:
    from decoding.sampling import SamplingParams


class Guide(ABC):
    """Per-sequence matcher state. Not thread-safe; the engine thread alone drives it."""

    @abstractmethod
    def fill_bitmask(self, row: torch.Tensor) -> None:
        """Write the allowed next tokens into `row` (int32, CPU, contiguous, >= ceil(V/32) words)."""

    @abstractmethod
    def advance(self, token_id: int) -> bool:
        """Accept one token. False if the grammar does not allow it (the guide is then unusable)."""

    @abstractmethod
    def rollback(self, n: int) -> None:
        """Undo the last n accepted tokens (speculative decoding rejects draft tokens)."""

    @abstractmethod
    def is_complete(self) -> bool:
        """The text so far matches the spec in full: EOS is allowed now."""

    @abstractmethod
    def is_terminated(self) -> bool:
        """Complete, and no token but EOS could follow: the sequence is done."""

    @abstractmethod
    def forced_tokens(self) -> list[int]:
        """Tokens the grammar forces next (each the only choice), for jump-forward. Does not advance."""

    def error(self) -> str | None:
        """Why the guide is stuck, if it is (a rejected token or a backend limit)."""
        return None

    def fork(self) -> Guide:
        """An independent copy at the same state (budget planning advances it). Optional."""
        raise NotImplementedError

    def accepts(self, token_ids: list[int]) -> int:
        """How many of `token_ids` would be accepted in a row from here (the guide is left as is)."""
        probe = self.fork()
        n = 0
        for t in token_ids:
            if not probe.advance(t):
                break
            n += 1
        return n


class CompiledGrammar(ABC):
    """A compiled spec; immutable, cached and shared by every request that asks for it."""

    backend: str          # "llguidance" | "outlines-core"
    kind: str
    compile_time_s: float = 0.0

    def new_guide(self, params: SamplingParams | None = None, *, max_tokens: int | None = None) -> Guide:
        """A fresh guide at the start of the grammar, for one generated sequence.

        A backend's own grammar has no notion of a budget and ignores `params` / `max_tokens`;
        the grammars GuideCompiler returns (`budget.BudgetGrammar`) use them to close the
        output before max_tokens."""
        return self._new_guide()

    @abstractmethod
    def _new_guide(self) -> Guide:
        """A fresh backend guide at the start of the grammar."""


def set_bits(row: torch.Tensor, ids: tuple[int, ...], value: bool) -> None:
    """Set (value=True) or clear token bits `ids` of an int32 bitmask row (CPU) in place."""
    words = row.numpy().view(np.uint32)
    for t in ids:
        w, b = divmod(int(t), 32)
        if w < words.shape[0]:
            if value:
                words[w] |= np.uint32(1 << b)
            else:
                words[w] &= np.uint32(~(1 << b) & 0xFFFFFFFF)
