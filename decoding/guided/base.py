"""The one interface every guided-decoding backend implements.

A backend compiles a `GuidedSpec` once into a `CompiledGrammar` (immutable, cached and shared);
each generated sequence gets its own `Guide` from `new_guide()`, which tracks where that sequence
is in the grammar.

Bitmask layout (llguidance's and xgrammar's, and `kernels.mask.apply_token_bitmask_`'s):
token 32*w + j is bit j of int32 word w; 1 = allowed. A row must cover the model's whole
vocabulary; ids the tokenizer does not know (padding rows of the embedding) are never allowed.

EOS: a guide allows the engine's EOS ids exactly when the text so far is a complete match
(`is_complete()`), and only then.
"""
from __future__ import annotations

from abc import ABC, abstractmethod

import numpy as np
import torch


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


class CompiledGrammar(ABC):
    """A compiled spec; immutable, cached and shared by every request that asks for it."""

    backend: str          # "llguidance" | "outlines-core"
    kind: str
    compile_time_s: float = 0.0

    @abstractmethod
    def new_guide(self) -> Guide:
        """A fresh guide at the start of the grammar."""


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
