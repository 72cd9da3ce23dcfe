"""What every proposer (n-gram, draft model) offers the engine.

Once per step, after the step's tokens are committed, the engine asks the proposer for draft
tokens for the requests that will decode next step (`ProposeContext`, one per request, with
`k` = the most tokens this request may take this step). The drafts are scheduled with the
request's last token as k+1 query rows of the next target forward and verified there by
`decoding.speculative.rejection`.

A deterministic proposer (n-gram) only returns tokens: rejection sampling treats its q as
one-hot at each draft token. A stochastic one (a draft model sampling at temperature > 0)
must also return, per row, the distribution each token was drawn from (`Draft.probs`): the
verification is lossless only for the q the token really came from.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from decoding.sampling import SamplingParams


@dataclass(slots=True)
class ProposeContext:
    """One request as a proposer sees it."""
    request_id: str
    token_ids: Sequence[int]           # prompt + committed output; never drafts
    num_prompt_tokens: int
    k: int                             # propose at most this many tokens (0: none)
    params: SamplingParams | None = None          # a draft model samples with the same processing
    generator: torch.Generator | None = None      # the request's own (seeded) generator, if any
    # The request's decoding.guided Guide, for a proposer that drafts under it (a draft model
    # masks its logits with it); it must leave the guide as it found it (advance, then roll back).
    guide: Any = None
    cache_salt: str = ""               # a proposer with its own prefix cache keeps tenants apart too

    @property
    def output_ids(self) -> Sequence[int]:
        return self.token_ids[self.num_prompt_tokens:]


@dataclass(slots=True)
class Draft:
    """A proposal for one request: 0..k tokens, and the distribution each was drawn from.

    `probs` is None for a deterministic proposal (q = one-hot at each token), else a float tensor
    [len(tokens), V_target] whose row j is the (processed, normalised) draft distribution that
    `tokens[j]` was drawn from, given the committed tokens and tokens[:j].
    """
    tokens: list[int]
    probs: torch.Tensor | None = None
    # Guided requests: the guide's bitmask at each of the len(tokens) + 1 verified positions
    # ([len + 1, words] int32, CPU), filled while drafting (`constrain_to_guide`), so that the
    # verification applies them without asking the guide again.
    bitmask: torch.Tensor | None = None
    # The proposer's own estimate, per token, of its chance to be accepted given the ones before
    # it were (suffix decoding's frequencies); None when it has none. Adaptive k reads it.
    confidence: list[float] | None = None

    def truncate(self, n: int) -> Draft:
        """The first n tokens (the scheduler's budget, a guide or adaptive k may cut a draft short)."""
        if n >= len(self.tokens):
            return self
        return Draft(self.tokens[:n], None if self.probs is None else self.probs[:n],
                     None if self.bitmask is None else self.bitmask[: n + 1],
                     None if self.confidence is None else self.confidence[:n])


class Proposer(ABC):
    """Propose draft tokens for a batch of requests.

    `propose` returns only the tokens (the interface an n-gram proposer needs); `draft` returns
    them with their distributions and is what the engine calls. A stochastic proposer overrides
    `draft` and sets `deterministic = False`.
    """

    deterministic: bool = True
    # Proposing costs next to nothing (a lookup): draft the most, let adaptive k trim. A draft
    # model is not cheap: it is asked for the k adaptive k chose.
    cheap: bool = True

    @abstractmethod
    def propose(self, contexts: Sequence[ProposeContext]) -> list[list[int]]:
        """Draft tokens per request, at most `ctx.k` each (an empty list: no proposal)."""

    def draft(self, contexts: Sequence[ProposeContext]) -> list[Draft]:
        return [Draft(tokens) for tokens in self.propose(contexts)]

    def complete(self, request_id: str, token_ids: Sequence[int], num_prompt_tokens: int, cache_salt: str) -> None:
        """A request finished with these tokens: a proposer that learns from earlier outputs
        (suffix decoding) keeps what it needs, under the request's salt. `free` follows."""

    def free(self, request_id: str) -> None:
        """Forget a request (finished, aborted or preempted): drop its state / draft KV."""

    def reset(self) -> None:
        """Forget every request."""

    def memory(self) -> dict[str, int]:
        """What the proposer holds, by kind, for metrics (nothing worth counting by default)."""
        return {}


def _allowed(row: torch.Tensor, token: int) -> bool:
    return bool((int(row[token >> 5]) >> (token & 31)) & 1)


def constrain_to_guide(guide: Any, tokens: Sequence[int], masks: torch.Tensor,
                       eos_token_ids: Collection[int] = ()) -> int:
    """How many leading draft tokens a guided request's grammar allows, with the masks to verify them.

    Walks the guide through the drafts: row j of `masks` (int32, CPU, [len(tokens) + 1, words])
    gets the guide's bitmask before draft j; the walk stops at the first token the mask does
    not allow. Returns n: drafts[:n] are allowed and rows 0..n are filled (row n masks the
    bonus / correction position). An allowed EOS ends the walk (the request finishes if it is
    accepted): the row after it is left all-ones, as nothing is sampled from it. The guide is
    rolled back to where it was.
    """
    if masks.shape[0] < len(tokens) + 1:
        raise ValueError(f"masks needs {len(tokens) + 1} rows, has {masks.shape[0]}")
    advanced = 0
    n = 0
    try:
        for t in tokens:
            row = masks[n]
            guide.fill_bitmask(row)
            if not _allowed(row, t):
                return n
            n += 1
            if t in eos_token_ids:
                masks[n].fill_(-1)
                return n
            if not guide.advance(t):
                # The mask allowed it, so this should not happen; never draft past it.
                n -= 1
                return n
            advanced += 1
        guide.fill_bitmask(masks[n])
        return n
    finally:
        guide.rollback(advanced)
