"""The engine's side of speculative decoding: who proposes, how many tokens, and the book.

`EngineCore` calls `propose` at the end of a step for the requests that just got a token, the
scheduler schedules each draft with the request's last token (k+1 query rows), the runner
returns k+1 logits rows for it (the step's `RowLayout` says where), the engine masks them with
the per-position masks a guided draft carries, and `verify` turns them into the emitted tokens. KV of
rejected positions needs no undo: it lies past `num_computed_tokens`, is rewritten by the next
step and never reaches the prefix cache. See decoding/speculative/DESIGN.md.
"""
from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

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
    SuffixProposer,
    VerifyResult,
    VerifyRow,
    constrain_to_guide,
)
from decoding.sampling import MAX_SPECULATIVE_TOKENS
from decoding.speculative.adaptive import (StepCost, acceptance, best_k, calibrated, confidence_scale, engine_prior,
                                          expected_tokens, position_probs)
from service.config import EngineConfig
from service.engine.request import Request


# The acceptance assumed before any draft was verified (a guess that makes the first drafts
# happen, so that real counts replace it).
DEFAULT_ACCEPTANCE = 0.7
# The engine-wide counts (the prior of a new request) keep about this many recent trials, so
# that the prior follows the traffic of now rather than of the engine's whole life.
PRIOR_WINDOW = 512


def _fade(book: list[float]) -> None:
    """Engine-wide counts [x, total] keep about PRIOR_WINDOW of total: an exponential window in
    which old counts fade."""
    if book[1] > PRIOR_WINDOW:
        book[0] = book[0] * PRIOR_WINDOW / book[1]
        book[1] = book[1] * PRIOR_WINDOW / book[1]


class Speculator:
    def __init__(self, config: EngineConfig, sampler: Sampler, eos_token_ids: Sequence[int],
                 bitmask_words: int, proposer: Proposer | None = None, query_limit: int | None = None) -> None:
        config.validate_speculative()
        # The most query rows one request may have in a step before the step leaves the
        # model's fast path (ModelRunner.fast_path_max_queries); None: no such cliff.
        self.query_limit = query_limit
        # Without a configured method speculation is off by default, but a request may still
        # ask for it: n-gram lookup costs no model, so it is always there to be asked for.
        self.default_k = config.num_speculative_tokens if config.speculative_method else 0
        if proposer is None and config.speculative_method == "suffix":
            proposer = SuffixProposer(MAX_SPECULATIVE_TOKENS, max_global_tokens=config.suffix_max_tokens)
        self.proposer = proposer or NgramProposer(MAX_SPECULATIVE_TOKENS, config.ngram_min_n, config.ngram_max_n)
        self.method = config.speculative_method or "ngram"
        self.verifier = SpeculativeVerifier(sampler)   # shares the sampler's scratch buffers
        self.tracker = SpecTracker(AutoDisablePolicy(config.spec_disable_window, config.spec_min_acceptance))
        self.eos_token_ids = frozenset(eos_token_ids)
        self.words = bitmask_words
        self.adaptive = config.spec_adaptive_k
        self.cost = StepCost()      # the engine's step timings, by row count
        # Per request: its counts in each state (`_Book`); the same over every request's recent
        # drafts, per state, the prior of a request with few counts of its own.
        self._books: dict[str, _Book] = {}
        self._prior = [[0.0, 0.0], [0.0, 0.0]]
        # A scoring proposer's recent drafts: [tokens accepted, tokens its scores predicted]
        # (confidence_scale).
        self._scored = [0.0, 0.0]
        self._draft_s_per_token = 0.0   # what proposing costs per draft token (a draft model's forwards)
        self._constrain_s = 0.0   # masking this step's drafts to their grammars, counted into its cost

    def k_for(self, params_k: int | None) -> int:
        return self.default_k if params_k is None else params_k

    # ---- proposing -------------------------------------------------------------------------

    def observe_step(self, rows: int, seconds: float) -> None:
        """A step's query rows and wall time (the cost model of adaptive k), with what masking its
        drafts to their grammars cost when they were proposed: a guided draft's positions each
        cost a mask, which is part of what a longer draft costs."""
        self.cost.observe(rows, seconds + self._constrain_s)
        self._constrain_s = 0.0

    @property
    def calibration_rows(self) -> int:
        """The most rows `calibrate` runs a step of (0: adaptive k is off, nothing to calibrate)."""
        return 1 + min(self.default_k, self._room(1)) if self.adaptive and self.default_k > 0 else 0

    def calibrate(self, step: Callable[[int], float], repeats: int = 3) -> dict[int, float]:
        """Measure, before the first request, what a lone sequence's step costs for each row count
        its drafts can bring (1 .. k + 1, within the fast path), `repeats` times each after one
        unmeasured run: `step(rows)` runs such a step and returns its seconds. Without it the
        first drafts were priced by guesses (a row count not measured yet is assumed as cheap as
        the largest one measured) and a new server's first requests paid for the tries: on free
        chat, three 9-row steps that each cost 3.6 one-row steps, for nothing accepted. The
        engine's own step timings replace these as they come (`StepCost` keeps the recent ones)."""
        for rows in range(1, self.calibration_rows + 1):
            step(rows)   # first-call allocations and this row count's code paths, not timed
            for _ in range(repeats):
                self.cost.observe(rows, step(rows))
        return self.cost.table()

    def propose(self, reqs: Sequence[Request]) -> None:
        """Give each request that may speculate its draft for the next step (`req.spec_draft`).

        With adaptive k, a cheap proposer (a lookup) drafts the most the request may take and
        the draft is trimmed to the length that pays; a draft model is asked for that length
        up front, as each of its tokens costs a forward."""
        ctxs: list[ProposeContext] = []
        owners: list[Request] = []
        others = max(0, len(reqs) - 1)
        step_rows = sum(_own_rows(r) for r in reqs)
        for req in reqs:
            if req.finished or not req.num_speculative_tokens or not self.tracker.enabled(req.request_id):
                continue
            own = _own_rows(req)
            # Every emitted token must fit under max_tokens: k drafts + 1 bonus.
            k = min(req.num_speculative_tokens, req.params.max_tokens - req.num_output_tokens - 1, self._room(own))
            if k > 0 and self._adapts(req) and not self.proposer.cheap:
                k = self._best_k(req, k, None, step_rows - own, others, self._draft_s_per_token, own)
            if k <= 0:
                continue
            ctxs.append(ProposeContext(req.request_id, req.token_ids, req.num_prompt_tokens, k,
                                       req.params, req.generator, req.guide, req.cache_salt))
            owners.append(req)
        if not ctxs:
            self._end_streaks(reqs)
            return
        t0 = time.perf_counter()
        drafts = self.proposer.draft(ctxs)
        drafted = sum(len(d.tokens) for d in drafts)
        if drafted:   # a moving average: the cost of proposing moves with the batch
            per_token = (time.perf_counter() - t0) / drafted
            self._draft_s_per_token += 0.2 * (per_token - self._draft_s_per_token)
        for req, draft in zip(owners, drafts):
            if draft.tokens and self._adapts(req) and self.proposer.cheap:
                own = _own_rows(req)
                draft = draft.truncate(self._best_k(req, len(draft.tokens), draft.confidence, step_rows - own,
                                                    others, 0.0, own))
            if draft.tokens and req.guide is not None and draft.bitmask is None:
                t1 = time.perf_counter()
                draft = self._constrain(req, draft)
                self._constrain_s += time.perf_counter() - t1
            req.spec_draft = draft if draft.tokens else None
        self._end_streaks(reqs)

    def _end_streaks(self, reqs: Sequence[Request]) -> None:
        """A request left without a draft this step starts its next one afresh (state 0)."""
        for req in reqs:
            book = self._books.get(req.request_id)
            if book is not None and req.spec_draft is None:
                book.streak = 0

    def _adapts(self, req: Request) -> bool:
        """A seeded sampled request keeps a fixed k: each verification draws k + 1 uniforms from
        its generator, so a k that followed timings would make its output depend on the
        machine's load. Greedy output does not depend on k at all."""
        return self.adaptive and (req.params.greedy or req.generator is None)

    def _room(self, own_rows: int) -> int:
        """The most draft tokens that keep a request with `own_rows` rows on the fast path. A
        request already past the limit (a long forced chunk) has left it anyway: no cap then."""
        if self.query_limit is None or own_rows > self.query_limit:
            return MAX_SPECULATIVE_TOKENS
        return self.query_limit - own_rows

    def _best_k(self, req: Request, max_k: int, confidence: list[float] | None, other_rows: int,
                other_tokens: int, draft_s_per_token: float, own_rows: int) -> int:
        book = self._books.get(req.request_id)
        state = book.streak if book is not None else 0
        prior = engine_prior(*self._prior[state], DEFAULT_ACCEPTANCE)
        mine = book.counts[state] if book is not None else (0, 0)
        if confidence is not None:
            scale = confidence_scale(*self._scored)
            if book is not None:
                scale = confidence_scale(*book.scored, prior=scale)
            confidence = calibrated(confidence, scale)
        probs = position_probs(acceptance(mine[0], mine[1], prior), max_k, confidence, mine[1])
        return best_k(probs, max_k, self.cost, other_rows, float(other_tokens), draft_s_per_token, own_rows,
                      probe_plain=not self.proposer.cheap)

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

    def record(self, req: Request, num_drafts: int, num_accepted: int, scores: Sequence[float] | None = None) -> None:
        """A verified draft of `num_drafts` tokens, `num_accepted` of them accepted; `scores`: the
        proposer's per-position scores of those tokens, if it scores them."""
        if num_drafts:
            trials = num_accepted + (num_accepted < num_drafts)
            book = self._books.get(req.request_id)
            if book is None:
                book = self._books[req.request_id] = _Book()
            for counts in (book.counts[book.streak], self._prior[book.streak]):
                counts[0] += num_accepted
                counts[1] += trials
            _fade(self._prior[book.streak])
            book.streak = int(num_accepted == num_drafts)
            if scores:
                predicted = expected_tokens(scores, num_drafts) - 1.0
                for scored in (book.scored, self._scored):
                    scored[0] += num_accepted
                    scored[1] += predicted
                _fade(self._scored)
        self.tracker.record(req.request_id, num_drafts, num_accepted)
        if not self.tracker.enabled(req.request_id):
            self.proposer.free(req.request_id)   # decodes normally from now on

    # ---- lifecycle -------------------------------------------------------------------------

    def preempted(self, req: Request) -> None:
        self.proposer.free(req.request_id)

    def finished(self, req: Request) -> dict | None:
        """Forget a finished request; its counters for the final response (None if it never could speculate)."""
        if req.finish_reason in ("stop", "eos", "length"):
            self.proposer.complete(req.request_id, req.token_ids, req.num_prompt_tokens, req.cache_salt)
        self.proposer.free(req.request_id)
        self._books.pop(req.request_id, None)
        stats = self.tracker.finish(req.request_id)
        return stats.as_dict() if req.num_speculative_tokens else None


@dataclass(slots=True)
class _Book:
    """A request's draft outcomes, in two states: after a draft that was accepted whole
    (`streak` 1) and otherwise (0, also after a step without a draft). Each state's counts are
    [accepted draft tokens, trials], a trial being an accepted token or the rejection that ends a
    draft, so accepted / trials estimates the per-token acceptance in that state. One rate for
    both undersold copying: on the copy prompts every draft after a whole one was accepted from
    its first token (16 of 16, k = 8), while after a partly rejected one 4 of 15 first tokens were
    (the text had left its source), and a rate of ~0.74 over both kept drafts short in the runs
    and long at the turns."""
    counts: list[list[int]] = field(default_factory=lambda: [[0, 0], [0, 0]])
    streak: int = 0
    scored: list[float] = field(default_factory=lambda: [0.0, 0.0])   # a scoring proposer's: [accepted, predicted]


def _own_rows(req: Request) -> int:
    """Query rows a request brings to its next step before any draft: its last token, and the
    tokens a grammar forced after it (jump-forward), whose KV is not computed yet."""
    return max(1, req.num_tokens - req.num_computed_tokens)
