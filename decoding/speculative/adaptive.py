"""Adaptive draft length: how many draft tokens pay, given what a step costs on this machine and
how often this request's drafts are accepted.

A step's time depends on how many query rows it computes, and not linearly: on a CPU a few
rows cost about one (the weights are streamed once either way), then each row costs more, and
past the native loop's row limit the whole step gets dearer. `StepCost` keeps the measured time
per row count (the median of the recent steps with that many rows, from the engine's own step
timings: no calibration run) and interpolates between the counts it has seen.

`best_k` then picks, for one request, the k that maximises tokens per second of the step it
joins: with acceptance rate a (each draft token accepted with probability a, given the ones
before it were), a draft of k yields E(k) = 1 + a + ... + a^k tokens, and the step costs
time(rows_of_others + 1 + k). k = 0 (plain decoding) is always a candidate, so speculation is
chosen only where the measured costs say it is faster. For a draft model the step without a
draft is measured first (no draft, for a few proposals, while no row count up to it is known);
row counts never measured are extrapolated optimistically (as cheap as the largest one
measured), so a new k gets tried, measured, and kept or dropped on its measurements.
"""
from __future__ import annotations

from bisect import bisect_left
from collections import deque
from collections.abc import Sequence
from statistics import median

# Acceptance assumed for a request with no history of its own, blended with its own counts
# (a Beta prior worth this many draft tokens).
PRIOR_WEIGHT = 4.0
# Proposals answered "no draft" for a row count not measured yet, so that plain steps of it get
# measured (a few steps' worth, for a few requests each).
PROBES = 12


class StepCost:
    """Measured seconds per step, by the number of query rows the step computed.

    A row count is *known* once it has `min_samples` measurements (their median shrugs off a
    first step that paid for a warm-up). Known counts are interpolated between; a count not yet
    known is assumed to cost what the largest known count below it costs, so that it gets
    tried and measured rather than ruled out by a guess."""

    def __init__(self, window: int = 16, min_samples: int = 3, max_rows: int = 4096) -> None:
        self.window = window
        self.min_samples = min_samples
        self.max_rows = max_rows
        self._times: dict[int, deque[float]] = {}
        self._known: list[int] = []       # row counts with min_samples measurements, sorted
        self._cache: dict[int, float] = {}
        self._probes: dict[int, int] = {}   # row count -> plain steps asked for, to measure it

    def observe(self, rows: int, seconds: float) -> None:
        if not 1 <= rows <= self.max_rows or seconds <= 0:
            return
        times = self._times.get(rows)
        if times is None:
            times = self._times[rows] = deque(maxlen=self.window)
        times.append(seconds)
        if len(times) == self.min_samples:
            self._known.insert(bisect_left(self._known, rows), rows)
        self._cache.pop(rows, None)

    def _measured(self, rows: int) -> float:
        value = self._cache.get(rows)
        if value is None:
            value = self._cache[rows] = median(self._times[rows])
        return value

    def time(self, rows: int) -> float | None:
        """Seconds for a step of `rows` rows: measured, interpolated between known counts, or
        (not known, or past the largest known count) the largest known count below it; the
        smallest known count's time below that; None before any count is known."""
        known = self._known
        if not known:
            return None
        i = bisect_left(known, rows)
        if i < len(known) and known[i] == rows:
            return self._measured(rows)
        if i == 0:
            return self._measured(known[0])
        lo = known[i - 1]
        if i == len(known) or len(self._times.get(rows, ())) < self.min_samples and rows in self._times:
            return self._measured(lo)   # optimistic: try it, and measure
        hi = known[i]
        t_lo, t_hi = self._measured(lo), self._measured(hi)
        return t_lo + (t_hi - t_lo) * (rows - lo) / (hi - lo)

    def should_probe(self, rows: int) -> bool:
        """Whether a step of `rows` rows should run without drafts, to be measured: no count of
        at most `rows` is known (`time(rows)` would rest on a dearer step's measurement), and
        fewer than PROBES asks were made for it. Bounded, because such a step may never happen
        as asked (another request's prefill chunk joins it): then the optimistic guess stands."""
        if self._known and self._known[0] <= rows:
            return False
        asked = self._probes.get(rows, 0)
        if asked >= PROBES:
            return False
        self._probes[rows] = asked + 1
        return True

    def table(self) -> dict[int, float]:
        """The median per known row count (for the bench and metrics)."""
        return {r: self._measured(r) for r in self._known}


def engine_prior(accepted: float, trials: float, default: float) -> float:
    """The acceptance a request with no history of its own is assumed to have: the engine's
    recent counts over all requests, blended with `default` (worth PRIOR_WEIGHT trials). Not the
    raw ratio: after one rejected first draft that would be 0, every request would then
    decline to draft, and with no drafts no count could ever correct it."""
    return (accepted + PRIOR_WEIGHT * default) / (trials + PRIOR_WEIGHT)


def acceptance(accepted: int, trials: int, prior: float) -> float:
    """A request's per-token acceptance rate, its own counts blended with the prior."""
    return (accepted + PRIOR_WEIGHT * prior) / (trials + PRIOR_WEIGHT)


def position_probs(rate: float, k: int, confidence: Sequence[float] | None = None,
                   history_trials: int = 0) -> list[float]:
    """Per draft position j, the chance it is accepted given the ones before it were: the
    request's rate, or — for a proposer that scores its tokens (suffix decoding's frequencies)
    — that score blended with the rate by how much history the rate has behind it."""
    if confidence is None:
        return [rate] * k
    w = history_trials / (history_trials + PRIOR_WEIGHT)
    return [w * rate + (1 - w) * c for c in confidence[:k]]


def confidence_scale(accepted: float, predicted: float, prior: float = 1.0) -> float:
    """How far a proposer's scores are to be trusted: the draft tokens accepted over the tokens its
    scores predicted (`expected_tokens` - 1 of each verified draft), blended with `prior` (worth
    PRIOR_WEIGHT tokens). A suffix tree's frequencies are raw counts: a continuation seen once
    scores 1.0, and on free chat (17% of such drafts accepted) they drafted ~3 tokens a step at
    0.90x plain decoding's speed. Kept engine-wide (prior 1) and per request (prior: the engine's
    scale), as text the engine's traffic made predictable (copying) may not be in one request (a
    chat turn after it kept drafting 3 tokens a step, each draft rejected whole)."""
    return (accepted + PRIOR_WEIGHT * prior) / (predicted + PRIOR_WEIGHT)


def calibrated(confidence: Sequence[float], scale: float) -> list[float]:
    """Per-position scores times `scale` (at most 1): scaling every conditional by one factor
    under-counts long drafts, which errs towards plain decoding."""
    return [min(1.0, c * scale) for c in confidence]


def expected_tokens(probs: Sequence[float] | float, k: int) -> float:
    """Tokens a draft of k yields: 1 + p1 + p1*p2 + ... (p a per-position list, or one rate)."""
    if isinstance(probs, (int, float)):
        probs = [float(probs)] * k
    total, survive = 1.0, 1.0
    for p in probs[:k]:
        survive *= p
        total += survive
    return total


def best_k(probs: Sequence[float] | float, max_k: int, cost: StepCost, other_rows: int = 0,
           other_tokens: float = 0.0, draft_s_per_token: float = 0.0, own_rows: int = 1,
           probe_plain: bool = False) -> int:
    """The draft length in [0, max_k] with the most tokens per second for the step: `probs` are
    the per-position acceptance chances (or one rate), the request brings `own_rows` rows besides
    its draft (its last token, and any tokens a grammar forced after it), the other requests of
    the step contribute `other_rows` rows and `other_tokens` tokens, each draft token costs
    `draft_s_per_token` to propose (a draft model's forward; 0 for a proposer that has drafted
    already). `probe_plain`: measure the plain step first (`StepCost.should_probe`), for a
    proposer whose drafts cost more than their rows (a draft model)."""
    if max_k <= 0:
        return 0
    rows = other_rows + max(1, own_rows)
    if probe_plain and cost.should_probe(rows):
        # Plain decoding first: its cost is what a draft model's drafts are weighed against.
        # Assumed as dear as the smallest count measured, its forwards looked nearly free and
        # plain steps, never chosen, were never measured to correct it (it drafted at 0.74x so).
        # Not for a lookup: its drafts cost only their rows, and its early tries measure the
        # row counts that interpolating from a prefill chunk's time would price out of reach.
        return 0
    base = cost.time(rows)
    if base is None:
        return max_k   # nothing measured yet (a draft model: no plain step came of asking): speculate, and measure
    best, best_rate = 0, (other_tokens + 1.0) / base
    for k in range(1, max_k + 1):
        t = cost.time(rows + k)
        rate = (other_tokens + expected_tokens(probs, k)) / (t + k * draft_s_per_token) if t else 0.0
        if rate > best_rate * (1.0 + 1e-9):
            best, best_rate = k, rate
    return best
