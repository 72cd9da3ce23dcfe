"""Sampling parameters and the batched sampler: logits of every row that needs a token -> tokens.

Pipeline per row (vLLM's order): penalties (repetition, frequency, presence) -> temperature ->
top-k -> top-p -> min-p -> draw. Logprobs are reported from the raw logits as given (vLLM v1's
default), before penalties and temperature.

The CPU is the hard case (up to 256 rows x 49152 vocab every step), so:
- work a batch does not need is skipped (no penalties, all greedy, no logprobs, no top-p ...);
- everything after the penalties runs in place on float32 buffers the Sampler reuses between
  steps (a fresh 50 MB tensor costs more in page faults than the arithmetic on it);
- the draw is an inverse-CDF search: one uniform number per row instead of V exponentials
  (an exponential race over 12.6 M elements takes ~200 ms on two cores; this draw ~2 ms);
- filters zero weights with F.threshold_ row by row (no 12.6 M-element mask tensor);
- top-p looks at a row's best 64 / 1024 / 8192 candidates and sorts the whole row only when the
  nucleus is larger still.

Seeded rows draw exactly one float64 uniform from their own generator per sampled token (none
for greedy rows), so their tokens do not depend on the other rows of the batch.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from decoding.guided.spec import GuidedSpec
from common.errors import InvalidArgumentError
from kernels import cpu_native

# Temperatures below this are treated as greedy (vLLM's _SAMPLING_EPS): dividing by them would
# overflow float32 logits into inf and the draw into NaN.
GREEDY_TEMPERATURE = 1e-5

MAX_N = 16
MAX_STOP_STRINGS = 16
MAX_LOGPROBS = 20
MAX_SPECULATIVE_TOKENS = 16
# OpenAI's limits on logit_bias: at most 300 tokens, each biased by a value in [-100, 100].
MAX_LOGIT_BIAS_ENTRIES = 300
MAX_LOGIT_BIAS = 100.0
_SEED_LIMIT = 2**63

# Block size of the two-level inverse-CDF draw: per-row block sums, then a cumsum inside one block.
DRAW_BLOCK = 256
# Candidate counts tried by top-p before it sorts the whole row.
_TOP_P_STAGES = (64, 1024, 8192)


@dataclass(slots=True)
class SamplingParams:
    n: int = 1
    max_tokens: int = 16
    temperature: float = 1.0          # 0 (or below GREEDY_TEMPERATURE) -> greedy
    top_k: int = 0                    # 0 or -1 -> off
    top_p: float = 1.0                # in (0, 1]
    min_p: float = 0.0                # in [0, 1]
    repetition_penalty: float = 1.0   # > 0; divides positive logits, multiplies negative ones, over prompt+output tokens
    presence_penalty: float = 0.0     # [-2, 2], OpenAI semantics, over output tokens
    frequency_penalty: float = 0.0    # [-2, 2]
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    include_stop_str_in_output: bool = False
    logprobs: int | None = None       # None: none; k >= 0: chosen token's logprob plus top-k alternatives
    skip_special_tokens: bool = True
    guided: GuidedSpec | None = None  # constrain the output to a JSON schema / regex / choice / grammar
    num_speculative_tokens: int | None = None   # draft tokens per step; None: the server's setting, 0: off
    logit_bias: dict[int, float] | None = None  # token id -> added to its logit (-100 bans it); see kernels/mask.py

    def validate(self, vocab_size: int | None = None) -> None:
        """Raise InvalidArgumentError naming the first bad field."""
        _check_int("n", self.n, 1, MAX_N)
        _check_int("max_tokens", self.max_tokens, 1, None)
        _check_float("temperature", self.temperature)
        if self.temperature < 0:
            raise InvalidArgumentError("temperature", f"must be >= 0, got {self.temperature}")
        _check_int("top_k", self.top_k, -1, None)
        _check_float("top_p", self.top_p)
        if not 0.0 < self.top_p <= 1.0:
            raise InvalidArgumentError("top_p", f"must be in (0, 1], got {self.top_p}")
        _check_float("min_p", self.min_p)
        if not 0.0 <= self.min_p <= 1.0:
            raise InvalidArgumentError("min_p", f"must be in [0, 1], got {self.min_p}")
        _check_float("repetition_penalty", self.repetition_penalty)
        if self.repetition_penalty <= 0:
            raise InvalidArgumentError("repetition_penalty", f"must be > 0, got {self.repetition_penalty}")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            _check_float(name, value)
            if not -2.0 <= value <= 2.0:
                raise InvalidArgumentError(name, f"must be in [-2, 2], got {value}")
        if self.seed is not None:
            _check_int("seed", self.seed, 0, _SEED_LIMIT - 1)
        self._validate_stops(vocab_size)
        if self.logprobs is not None:
            _check_int("logprobs", self.logprobs, 0, MAX_LOGPROBS)
        for name in ("ignore_eos", "include_stop_str_in_output", "skip_special_tokens"):
            if not isinstance(getattr(self, name), bool):
                raise InvalidArgumentError(name, "must be a boolean")
        if self.num_speculative_tokens is not None:
            _check_int("num_speculative_tokens", self.num_speculative_tokens, 0, MAX_SPECULATIVE_TOKENS)
        if self.logit_bias:
            self._validate_logit_bias(vocab_size)
        if self.guided is not None:
            if not isinstance(self.guided, GuidedSpec):
                raise InvalidArgumentError("guided", "must be a GuidedSpec")
            self.guided.validate()

    def _validate_stops(self, vocab_size: int | None) -> None:
        # A bare string would otherwise be taken as a list of one-character stop strings.
        if not isinstance(self.stop, (list, tuple)):
            raise InvalidArgumentError("stop", "must be a list of strings")
        if len(self.stop) > MAX_STOP_STRINGS:
            raise InvalidArgumentError("stop", f"at most {MAX_STOP_STRINGS} stop strings, got {len(self.stop)}")
        for s in self.stop:
            if not isinstance(s, str) or not s:
                raise InvalidArgumentError("stop", f"every stop string must be a non-empty string, got {s!r}")
        if not isinstance(self.stop_token_ids, (list, tuple)):
            raise InvalidArgumentError("stop_token_ids", "must be a list of token ids")
        upper = f"[0, {vocab_size})" if vocab_size is not None else ">= 0"
        for t in self.stop_token_ids:
            if not _is_int(t) or t < 0 or (vocab_size is not None and t >= vocab_size):
                raise InvalidArgumentError("stop_token_ids", f"every id must be an int in {upper}, got {t!r}")

    def _validate_logit_bias(self, vocab_size: int | None) -> None:
        bias = self.logit_bias
        if not isinstance(bias, dict):
            raise InvalidArgumentError("logit_bias", "must be a map of token id to bias")
        if len(bias) > MAX_LOGIT_BIAS_ENTRIES:
            raise InvalidArgumentError("logit_bias", f"at most {MAX_LOGIT_BIAS_ENTRIES} entries, got {len(bias)}")
        upper = f"[0, {vocab_size})" if vocab_size is not None else ">= 0"
        for token, value in bias.items():
            if not _is_int(token) or token < 0 or (vocab_size is not None and token >= vocab_size):
                raise InvalidArgumentError("logit_bias", f"every token id must be an int in {upper}, got {token!r}")
            _check_float("logit_bias", value)
            if not -MAX_LOGIT_BIAS <= value <= MAX_LOGIT_BIAS:
                raise InvalidArgumentError(
                    "logit_bias", f"bias of token {token} must be in [-100, 100], got {value}")

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_TEMPERATURE

    @property
    def has_penalty(self) -> bool:
        """Any of the repetition, presence and frequency penalties is on."""
        return self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_int(name: str, value: object, low: int, high: int | None) -> None:
    if not _is_int(value):
        raise InvalidArgumentError(name, f"must be an integer, got {value!r}")
    if value < low or (high is not None and value > high):
        bound = f"in [{low}, {high}]" if high is not None else f">= {low}"
        raise InvalidArgumentError(name, f"must be {bound}, got {value}")


def _check_float(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise InvalidArgumentError(name, f"must be a finite number, got {value!r}")


@dataclass(slots=True)
class TokenLogprobs:
    token_id: int
    logprob: float
    top: list[tuple[int, float]]      # top-k (id, logprob), best first


@dataclass(slots=True)
class SampleRequest:
    """One row of the batch. `prompt_ids`/`output_ids` may be lists or 1-D integer tensors (tensors
    save a conversion when penalties are on); they are read only for penalised rows."""
    params: SamplingParams
    prompt_ids: Sequence[int]
    output_ids: Sequence[int]
    generator: torch.Generator | None = None   # drives this row's draws when set (seeded requests)


class NoValidTokenError(ValueError):
    """Some rows have no token to choose: every logit is -inf (an over-eager mask) or NaN.

    `rows` are their indices in the batch; the other rows were fine, so the engine can fail
    just these requests and run the step again without them.
    """

    def __init__(self, rows: list[int]) -> None:
        super().__init__(f"no token with a finite logit in batch rows {rows}")
        self.rows = rows


# ---- the pipeline shared by Sampler.__call__ and probs_for ------------------------------------


@dataclass(slots=True)
class _Decision:
    """What the pipeline settles for a batch: greedy rows' tokens, sampled rows' weights."""
    greedy_rows: list[int]
    greedy_tokens: torch.Tensor | None     # [G] long
    sampled_rows: list[int]
    weights: torch.Tensor | None           # [S, V] float32, unnormalised (row max 1), 0 = excluded


def _decide(logits: torch.Tensor, rows: Sequence[SampleRequest], scratch: _Scratch | None) -> _Decision:
    if logits.dim() != 2 or logits.shape[0] != len(rows):
        raise ValueError(f"logits must be [len(rows), V]; got {tuple(logits.shape)} for {len(rows)} rows")
    batch = len(rows)
    greedy = [i for i in range(batch) if rows[i].params.greedy]
    sampled = [i for i in range(batch) if not rows[i].params.greedy]
    penalised = [i for i in range(batch) if rows[i].params.has_penalty]

    base = logits
    if penalised:
        base = _float_rows(logits, None, scratch, "base")
        _penalise_(base, rows, penalised)

    bad: list[int] = []
    greedy_tokens = None
    if greedy:
        try:
            greedy_tokens = _argmax_rows(base, greedy)
        except NoValidTokenError as exc:
            bad += exc.rows
    weights = None
    if sampled:
        if len(sampled) == batch and base is not logits:
            x = base    # our penalised copy, and nothing else reads it any more: work in place
        else:
            x = _float_rows(base, None if len(sampled) == batch else sampled, scratch, "work")
        try:
            weights = _weights_(x, [rows[i].params for i in sampled], sampled)
        except NoValidTokenError as exc:
            bad += exc.rows
    if bad:
        raise NoValidTokenError(sorted(bad))
    return _Decision(greedy, greedy_tokens, sampled, weights)


def _index(rows: Sequence[int], device: torch.device) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.long, device=device)


class _Scratch:
    """Float32 buffers reused across steps, by name: a fresh [256, 49152] tensor costs more in
    page faults (~15 ms on one core) than a pass over it."""

    __slots__ = ("_bufs",)

    def __init__(self) -> None:
        self._bufs: dict[str, torch.Tensor] = {}

    def get(self, name: str, shape: tuple[int, int], device: torch.device) -> torch.Tensor:
        need = shape[0] * shape[1]
        buf = self._bufs.get(name)
        if buf is None or buf.numel() < need or buf.device != device:
            buf = self._bufs[name] = torch.empty(need, dtype=torch.float32, device=device)
        return buf[:need].view(shape)


def _float_rows(src: torch.Tensor, rows: list[int] | None, scratch: _Scratch | None, name: str) -> torch.Tensor:
    """A contiguous float32 copy of `rows` of src (all when None) that we may modify; the caller's
    logits are never touched."""
    shape = (src.shape[0] if rows is None else len(rows), src.shape[1])
    if scratch is None:
        out = torch.empty(shape, dtype=torch.float32, device=src.device)
    else:
        out = scratch.get(name, shape, src.device)
    if rows is None:
        return out.copy_(src)
    idx = _index(rows, src.device)
    if src.dtype == torch.float32:
        return torch.index_select(src, 0, idx, out=out)
    return out.copy_(src.index_select(0, idx))


def _argmax_rows(x: torch.Tensor, rows: list[int]) -> torch.Tensor:
    """Greedy tokens; ties go to the lowest id (torch.max returns the first maximal index)."""
    # max(dim) is several times faster than argmax on CPU and has the same tie rule; the native
    # kernel ~3x faster again (torch's keeps its running index in a scalar loop). Reducing every
    # row is cheaper than copying out the greedy ones first.
    values, tokens = cpu_native.argmax_rows(x) if x.dim() == 2 and cpu_native.usable(x) else x.max(dim=-1)
    if len(rows) != x.shape[0]:
        idx = _index(rows, x.device)
        values, tokens = values[idx], tokens[idx]
    bad = ~(values > float("-inf"))   # NaN, or every token masked out
    if bool(bad.any()):
        raise NoValidTokenError([rows[i] for i in bad.nonzero().flatten().tolist()])
    return tokens


# ---- penalties ----------------------------------------------------------------------------------


def _penalise_(x: torch.Tensor, rows: Sequence[SampleRequest], penalised: list[int]) -> None:
    """Apply penalties in place on contiguous float32 x [B, V].

    Only the (row, token) cells that occur in a prompt or output change, so the work is gathered
    at those cells instead of passing over the whole vocabulary.
    """
    vocab = x.shape[1]
    flat = x.view(-1)
    device = x.device

    rep_rows = [i for i in penalised if rows[i].params.repetition_penalty != 1.0]
    if rep_rows:
        seen = torch.cat([
            _cells([rows[i].prompt_ids for i in rep_rows], rep_rows, vocab, device),
            _cells([rows[i].output_ids for i in rep_rows], rep_rows, vocab, device),
        ]).unique()
        if seen.numel():
            factor = _row_values([rows[i].params.repetition_penalty for i in range(len(rows))], device)
            factor = factor[seen // vocab]
            v = flat[seen]
            flat[seen] = torch.where(v > 0, v / factor, v * factor)

    fp_rows = [i for i in penalised
               if rows[i].params.frequency_penalty != 0.0 or rows[i].params.presence_penalty != 0.0]
    if fp_rows:
        cells, counts = _cells([rows[i].output_ids for i in fp_rows], fp_rows, vocab, device).unique(
            return_counts=True)
        if cells.numel():
            r = cells // vocab
            freq = _row_values([rows[i].params.frequency_penalty for i in range(len(rows))], device)[r]
            pres = _row_values([rows[i].params.presence_penalty for i in range(len(rows))], device)[r]
            flat[cells] = flat[cells] - freq * counts.to(torch.float32) - pres


def _row_values(values: list[float], device: torch.device) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32, device=device)


def _cells(seqs: list[Sequence[int]], row_ids: list[int], vocab: int, device: torch.device) -> torch.Tensor:
    """Flat indices row * V + token of every token in `seqs` (duplicates kept)."""
    parts = [torch.as_tensor(s, dtype=torch.long).to(device) + r * vocab for s, r in zip(seqs, row_ids) if len(s)]
    if not parts:
        return torch.empty(0, dtype=torch.long, device=device)
    return torch.cat(parts)


# ---- temperature, top-k, top-p, min-p --------------------------------------------------------


def _weights_(x: torch.Tensor, params: list[SamplingParams], batch_rows: list[int]) -> torch.Tensor:
    """Turn penalised logits x [R, V] (float32, ours) in place into sampling weights.

    The weights are exp(logit/T - max): unnormalised, the best token has weight exactly 1, and a
    filtered-out or -inf token has weight exactly 0, so the draw can never pick it.
    """
    temps = [p.temperature for p in params]
    if any(t != 1.0 for t in temps):
        x.div_(_row_values(temps, x.device).unsqueeze(1))
    top = x.amax(dim=-1, keepdim=True)
    bad = ~torch.isfinite(top.squeeze(1))
    if bool(bad.any()):
        raise NoValidTokenError([batch_rows[i] for i in bad.nonzero().flatten().tolist()])
    x.sub_(top).exp_()

    vocab = x.shape[1]
    top_k = [p.top_k if 0 < p.top_k < vocab else 0 for p in params]
    k_rows = [i for i, k in enumerate(top_k) if k]
    if k_rows:
        _apply_top_k_(x, k_rows, [top_k[i] for i in k_rows])
    p_rows = [i for i, p in enumerate(params) if p.top_p < 1.0]
    if p_rows:
        k_hint = max((top_k[i] for i in p_rows), default=0)
        _apply_top_p_(x, p_rows, [params[i].top_p for i in p_rows], k_hint)
    m_rows = [i for i, p in enumerate(params) if p.min_p > 0.0]
    if m_rows:
        # The best token's weight is 1, so "p >= min_p * p_max" is "weight >= min_p"; top-k/top-p
        # renormalisation does not change that ratio.
        _zero_below_(x, m_rows, _row_values([params[i].min_p for i in m_rows], x.device))
    return x


def _apply_top_k_(w: torch.Tensor, rows: list[int], ks: list[int]) -> None:
    kth = torch.topk(_rows_of(w, rows), max(ks), dim=-1, sorted=True).values
    threshold = kth.gather(1, torch.tensor(ks, device=w.device).sub_(1).unsqueeze(1)).squeeze(1)
    # Ties with the k-th weight are kept (as in vLLM): they are equally likely.
    _zero_below_(w, rows, threshold)


def _apply_top_p_(w: torch.Tensor, rows: list[int], top_p: list[float], k_hint: int) -> None:
    p = torch.tensor(top_p, dtype=torch.float64, device=w.device)
    _zero_below_(w, rows, _top_p_thresholds(_rows_of(w, rows), p, k_hint))


def _top_p_thresholds(w: torch.Tensor, top_p: torch.Tensor, k_hint: int) -> torch.Tensor:
    """Per row, the smallest weight in the nucleus: the best tokens, in order, while the mass of
    the tokens ranked above each one is below top_p (so the token that crosses top_p is kept).

    Sorting a whole 49k row costs ~2.7 ms on one core; most nuclei are far smaller, so try the best
    64, 1024, 8192 candidates, and sort fully only rows whose nucleus is larger still. The cumulative sums
    are sequential float64 scans, so a row's prefix sums, and hence its cut, do not depend on
    which stage found it.
    """
    rows, vocab = w.shape
    limit = w.sum(dim=-1).double() * top_p
    threshold = torch.empty(rows, dtype=w.dtype, device=w.device)
    todo = torch.arange(rows, device=w.device)
    stages = sorted({min(vocab, max(s, k_hint)) for s in _TOP_P_STAGES} | {vocab})
    for size in stages:
        cand = w if todo.numel() == rows else w.index_select(0, todo)
        if size >= vocab:
            values = torch.sort(cand, dim=-1, descending=True).values
        else:
            values = torch.topk(cand, size, dim=-1, sorted=True).values
        v64 = values.double()
        cum = v64.cumsum(dim=-1)
        lim = limit.index_select(0, todo).unsqueeze(1)
        keep = ((cum - v64) < lim).sum(dim=-1)          # >= 1: nothing ranks above the best token
        found = (keep < size) | (cum[:, -1] >= lim[:, 0]) | (size >= vocab)
        cut = values.gather(1, (keep - 1).unsqueeze(1)).squeeze(1)
        threshold[todo[found]] = cut[found]
        todo = todo[~found]
        if todo.numel() == 0:
            break
    return threshold


def _rows_of(w: torch.Tensor, rows: list[int]) -> torch.Tensor:
    """Rows of w to read: w itself when that is all of them, else a copy."""
    return w if len(rows) == w.shape[0] else w.index_select(0, _index(rows, w.device))


_NEG_INF = torch.tensor(float("-inf"))


def _zero_below_(w: torch.Tensor, rows: list[int], threshold: torch.Tensor) -> None:
    """Zero the weights of `rows` of w below their per-row threshold, in place (ties are kept)."""
    if w.device.type == "cpu":
        # F.threshold_ is one pass with no mask tensor, ~10x faster than masked_fill on CPU. It
        # keeps x > t, so give it the next float below the threshold: x > prev(t) <=> x >= t.
        below = torch.nextafter(threshold.to(torch.float32).cpu(), _NEG_INF).tolist()
        for i, t in zip(rows, below):
            torch.nn.functional.threshold_(w[i], t, 0.0)
        return
    threshold = threshold.to(w.dtype).unsqueeze(1)
    if len(rows) == w.shape[0]:
        w.masked_fill_(w < threshold, 0.0)
        return
    idx = _index(rows, w.device)
    sub = w.index_select(0, idx)
    w.index_copy_(0, idx, sub.masked_fill_(sub < threshold, 0.0))


# ---- the draw ---------------------------------------------------------------------------------


def draw_tokens(w: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF sampling of one token per row from weights w [R, V] with uniforms u [R] in [0, 1).

    Two levels keep it cheap: cumulative sums of per-block totals pick a block, then a cumsum over
    that block's weights picks the token. A zero-weight token never has a CDF step of its own,
    and every clamp below lands on a token with weight, so excluded tokens are never drawn.
    """
    rows, vocab = w.shape
    block = DRAW_BLOCK
    full = vocab // block
    parts = []
    if full:
        parts.append(w[:, : full * block].reshape(rows, full, block).sum(dim=-1))
    if full * block < vocab:
        parts.append(w[:, full * block:].sum(dim=-1, keepdim=True))
    block_sum = (torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]).double()
    block_cdf = block_sum.cumsum(dim=-1)
    total = block_cdf[:, -1:].contiguous()
    target = u.to(torch.float64).unsqueeze(1) * total
    # First block whose CDF exceeds the target; clamped to the last block with mass because
    # u * total can round up to total.
    b = torch.minimum(
        torch.searchsorted(block_cdf, target, right=True),
        torch.searchsorted(block_cdf, total, right=False),
    )
    before = torch.where(b > 0, block_cdf.gather(1, (b - 1).clamp_min(0)), torch.zeros_like(target))
    # Where the target falls inside the block, as a fraction: rescaling to the block's own cumsum
    # means the two different summation orders cannot disagree about the block's mass.
    frac = (target - before) / block_sum.gather(1, b)
    positions = b * block + torch.arange(block, device=w.device)
    inside = positions < vocab
    bw = w.gather(1, positions.clamp_max(vocab - 1)).double() * inside
    cdf = bw.cumsum(dim=-1)
    mass = cdf[:, -1:].contiguous()
    j = torch.minimum(
        torch.searchsorted(cdf, frac * mass, right=True),
        torch.searchsorted(cdf, mass, right=False),
    )
    return (b * block + j).squeeze(1)


def _uniforms(rows: Sequence[SampleRequest], sampled: list[int], device: torch.device) -> torch.Tensor:
    """One uniform per sampled row: from the row's own generator when it has one, else the global RNG."""
    u = torch.rand(len(sampled), dtype=torch.float64).tolist()
    for j, i in enumerate(sampled):
        g = rows[i].generator
        if g is not None:
            u[j] = torch.rand((), dtype=torch.float64, generator=g, device=g.device).item()
    return torch.tensor(u, dtype=torch.float64, device=device)


# ---- public API -------------------------------------------------------------------------------


class Sampler:
    """Batched sampler. Not thread-safe: it reuses scratch buffers between calls (the engine
    calls it from its single step thread)."""

    def __init__(self) -> None:
        self._scratch = _Scratch()

    @staticmethod
    def make_generator(seed: int, device: str | torch.device = "cpu") -> torch.Generator:
        """A request's own generator. Keep it on the CPU even when logits are on a GPU: it yields
        one number per step, and CPU streams do not depend on the GPU model."""
        g = torch.Generator(device=device)
        g.manual_seed(seed)
        return g

    def __call__(
        self, logits: torch.Tensor, rows: list[SampleRequest]
    ) -> tuple[list[int], list[TokenLogprobs | None]]:
        if not rows:
            return [], []
        d = _decide(logits, rows, self._scratch)
        tokens = torch.empty(len(rows), dtype=torch.long, device=logits.device)
        if d.greedy_tokens is not None:
            tokens[_index(d.greedy_rows, logits.device)] = d.greedy_tokens
        if d.weights is not None:
            drawn = draw_tokens(d.weights, _uniforms(rows, d.sampled_rows, logits.device))
            tokens[_index(d.sampled_rows, logits.device)] = drawn
        # The weights are spent: the logprobs may reuse their scratch buffer.
        return tokens.tolist(), _logprobs(logits, rows, tokens, self._scratch)

    def sampling_weights(self, logits: torch.Tensor, rows: list[SampleRequest]) -> torch.Tensor:
        """[len(rows), V] float32: the unnormalised weights `probs_for` normalises (penalties,
        temperature, top-k, top-p, min-p applied; row max 1, excluded tokens 0) for rows that all
        sample. They live in this sampler's scratch buffers: valid until its next call.
        Raises NoValidTokenError as __call__ does."""
        if any(r.params.greedy for r in rows):
            raise ValueError("sampling_weights: greedy rows have no weights")
        d = _decide(logits, rows, self._scratch)
        assert d.weights is not None
        return d.weights


def probs_for(logits: torch.Tensor, rows: list[SampleRequest]) -> torch.Tensor:
    """The exact distribution `Sampler.__call__` draws from, as float32 probabilities [B, V]:
    after penalties, temperature, top-k, top-p and min-p; greedy rows are one-hot. Draws nothing."""
    return _probs(logits, rows, None)


def _probs(logits: torch.Tensor, rows: list[SampleRequest], scratch: _Scratch | None) -> torch.Tensor:
    out = torch.zeros(logits.shape[0], logits.shape[1], dtype=torch.float32, device=logits.device)
    if not rows:
        return out
    d = _decide(logits, rows, scratch)
    if d.greedy_tokens is not None:
        out[_index(d.greedy_rows, logits.device), d.greedy_tokens] = 1.0
    if d.weights is not None:
        w = d.weights
        out.index_copy_(0, _index(d.sampled_rows, logits.device), w / w.sum(dim=-1, keepdim=True))
    return out


def token_logprobs(logits: torch.Tensor, rows: Sequence[SampleRequest], tokens: torch.Tensor
                   ) -> list[TokenLogprobs | None]:
    """What __call__ reports for `tokens` chosen elsewhere (speculative verification): the
    logprobs of the raw logits, for the rows that asked (None for the others)."""
    return _logprobs(logits, rows, tokens, None)


SUM_CHUNK = 1024


def _row_sums(x: torch.Tensor) -> torch.Tensor:
    """x [rows, n].sum(-1, keepdim=True), each row summed in the same order whatever the number of
    rows: torch splits one long row's sum across threads but gives many rows a thread each, so a
    speculative verify step's logprobs differed from plain decoding's in the last bits. Chunks of
    SUM_CHUNK are summed each on one thread, then their sums in order."""
    rows, n = x.shape
    whole = n - n % SUM_CHUNK
    total = x[:, :whole].reshape(rows, whole // SUM_CHUNK, SUM_CHUNK).sum(-1).sum(-1, keepdim=True)
    return total + x[:, whole:].sum(-1, keepdim=True) if whole < n else total


def _logprobs(
    logits: torch.Tensor, rows: Sequence[SampleRequest], tokens: torch.Tensor, scratch: _Scratch | None
) -> list[TokenLogprobs | None]:
    """Logprobs of the raw logits (before penalties and temperature), for rows that asked.

    logprob = logit - logsumexp(row): only the chosen and top-k entries are needed, so the full
    log_softmax is never materialised (top-k of the logits is top-k of the logprobs).
    """
    result: list[TokenLogprobs | None] = [None] * len(rows)
    wanted = [i for i, r in enumerate(rows) if r.params.logprobs is not None]
    if not wanted:
        return result
    x = _float_rows(logits, None if len(wanted) == len(rows) else wanted, scratch, "work")
    chosen_t = tokens.index_select(0, _index(wanted, tokens.device))
    chosen_logit = x.gather(1, chosen_t.unsqueeze(1))
    k_max = min(max(rows[i].params.logprobs or 0 for i in wanted), x.shape[1])
    top = torch.topk(x, k_max, dim=-1, sorted=True) if k_max else None
    peak = x.amax(dim=-1, keepdim=True)
    lse = peak + _row_sums(x.sub_(peak).exp_()).log_()
    chosen = (chosen_logit - lse).squeeze(1).tolist()
    chosen_ids = chosen_t.tolist()
    top_vals: list[list[float]] = [[] for _ in wanted]
    top_ids: list[list[int]] = [[] for _ in wanted]
    if top is not None:
        top_vals, top_ids = (top.values - lse).tolist(), top.indices.tolist()
    for j, i in enumerate(wanted):
        k = rows[i].params.logprobs or 0
        result[i] = TokenLogprobs(
            token_id=chosen_ids[j],
            logprob=chosen[j],
            top=list(zip(top_ids[j][:k], top_vals[j][:k])),
        )
    return result
