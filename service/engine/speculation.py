"""The engine's side of speculative decoding: who proposes, how many tokens, and the book.

`EngineCore` calls `propose` at the end of a step for the requests that just got a token, the
scheduler schedules each draft with the request's last token (k+1 query rows), the runner
returns k+1 logits rows for it (the step's `RowLayout` says where), the engine masks them with
the per-position masks a guided draft carries, and `verify` turns them into the emitted tokens. KV of
rejected positions needs no undo: it lies past `num_computed_tokens`, is rewritten by the next
step and never reaches the prefix cache. See decoding/speculative/DESIGN.md.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

from decoding.sampling import Sampler
from decoding.speculative import (
    AutoDisablePolicy,
    Draft,
    NgramProposer,
    ProposeContext,
    Proposer,
    SpecTracker,
    SpeculativeVerifier,
    VerifyResult,
    VerifyRow,
    constrain_to_guide,
)
from decoding.sampling import MAX_SPECULATIVE_TOKENS
from service.config import EngineConfig
from service.engine.request import Request


class Speculator:
    def __init__(self, config: EngineConfig, sampler: Sampler, eos_token_ids: Sequence[int],
                 bitmask_words: int, proposer: Proposer | None = None) -> None:
        config.validate_speculative()
        # Without a configured method speculation is off by default, but a request may still
        # ask for it: n-gram lookup costs no model, so it is always there to be asked for.
        self.default_k = config.num_speculative_tokens if config.speculative_method else 0
        self.proposer = proposer or NgramProposer(MAX_SPECULATIVE_TOKENS, config.ngram_min_n, config.ngram_max_n)
        self.method = config.speculative_method or "ngram"
        self.verifier = SpeculativeVerifier(sampler)   # shares the sampler's scratch buffers
        self.tracker = SpecTracker(AutoDisablePolicy(config.spec_disable_window, config.spec_min_acceptance))
        self.eos_token_ids = frozenset(eos_token_ids)
        self.words = bitmask_words

    def k_for(self, params_k: int | None) -> int:
        return self.default_k if params_k is None else params_k

    # ---- proposing -------------------------------------------------------------------------

    def propose(self, reqs: Sequence[Request]) -> None:
        """Give each request that may speculate its draft for the next step (`req.spec_draft`)."""
        ctxs: list[ProposeContext] = []
        owners: list[Request] = []
        for req in reqs:
            if req.finished or not req.num_speculative_tokens or not self.tracker.enabled(req.request_id):
                continue
            # Every emitted token must fit under max_tokens: k drafts + 1 bonus.
            k = min(req.num_speculative_tokens, req.params.max_tokens - req.num_output_tokens - 1)
            if k <= 0:
                continue
            ctxs.append(ProposeContext(req.request_id, req.token_ids, req.num_prompt_tokens, k,
                                       req.params, req.generator, req.guide, req.cache_salt))
            owners.append(req)
        if not ctxs:
            return
        for req, draft in zip(owners, self.proposer.draft(ctxs)):
            if draft.tokens and req.guide is not None and draft.bitmask is None:
                draft = self._constrain(req, draft)
            req.spec_draft = draft if draft.tokens else None

    def _constrain(self, req: Request, draft: Draft) -> Draft:
        """Cut a draft at the first token the grammar forbids; keep the mask of every verified position."""
        masks = torch.empty((len(draft.tokens) + 1, self.words), dtype=torch.int32)
        n = constrain_to_guide(req.guide, draft.tokens, masks, self.eos_token_ids)
        cut = draft.truncate(n)
        return Draft(cut.tokens, cut.probs, masks[: n + 1])

    # ---- verifying -------------------------------------------------------------------------

    def verify(self, reqs: Sequence[Request], logits: torch.Tensor) -> list[VerifyResult]:
        """Emitted tokens per request (accepted drafts + one more), from its 1 + k rows of
        `logits`, back to back in `reqs` order and already masked by any guide. Raises
        NoValidTokenError (indices into `reqs`) before any generator moves."""
        rows = [VerifyRow(r.params, r.prompt_ids, r.output_ids, r.spec_draft.tokens, r.spec_draft.probs, r.generator)
                for r in reqs]
        return self.verifier(logits, rows)

    def record(self, req: Request, num_drafts: int, num_accepted: int) -> None:
        self.tracker.record(req.request_id, num_drafts, num_accepted)
        if not self.tracker.enabled(req.request_id):
            self.proposer.free(req.request_id)   # decodes normally from now on

    # ---- lifecycle -------------------------------------------------------------------------

    def preempted(self, req: Request) -> None:
        self.proposer.free(req.request_id)

    def finished(self, req: Request) -> dict | None:
        """Forget a finished request; its counters for the final response (None if it never could speculate)."""
        self.proposer.free(req.request_id)
        stats = self.tracker.finish(req.request_id)
        return stats.as_dict() if req.num_speculative_tokens else None
