"""Lossless verification of draft tokens (Leviathan et al. 2023; Chen et al. 2023).

A speculating row has k draft tokens x_1..x_k, drawn from draft distributions q_1..q_k, and
k+1 target distributions p_1..p_{k+1} from one target forward (p_j conditioned on the
committed tokens and x_1..x_{j-1}). For j = 1..k: accept x_j with probability
min(1, p_j(x_j) / q_j(x_j)); at the first rejection emit a token drawn from
norm(max(0, p_j - q_j)) and stop; if all k are accepted, emit a bonus token drawn from
p_{k+1}. Each emitted token is then distributed exactly as p (the papers' theorem), so a row
yields 1..k+1 tokens distributed as the target model alone would produce them.

- Deterministic drafts (n-gram, greedy draft model): q_j is one-hot at x_j. Acceptance is
  then "u < p_j(x_j)" and the residual is p_j without x_j, which is lossless for *any* x_j,
  however it was chosen.
- q_j(x_j) = 0 (a token its own q says cannot occur: rounding, or a caller's inconsistency):
  that position is verified as a one-hot draft, which stays exactly lossless given x_j.
- max(0, p_j - q_j) with no positive mass (p_j == q_j up to rounding, so a rejection had
  probability ~0 and happened by rounding): the token is drawn from p_j.
- Greedy rows: accept while x_j == argmax p_j, then emit argmax at the first mismatch (or the
  bonus position): exactly the tokens greedy decoding without speculation gives. No random
  numbers are drawn for them.
- Randomness: each sampled row draws k+1 float64 uniforms per step — k for the acceptance
  tests and one for the final draw — from its own torch.Generator when it has one (seeded
  requests stay reproducible whatever else is in the batch), else from torch's global RNG.

`rejection_sample` works on probabilities (the statistical tests drive it directly);
`SpeculativeVerifier` is what the engine calls: target logits in, the same penalties /
temperature / top-k / top-p / min-p processing as normal sampling (`decoding.sampling`),
tokens and logprobs out.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from decoding.row_layout import RowLayout
from decoding.sampling import (
    DRAW_BLOCK,
    NoValidTokenError,
    Sampler,
    SampleRequest,
    SamplingParams,
    TokenLogprobs,
    draw_tokens,
    token_logprobs,
)


def _layout(ks: Sequence[int]) -> RowLayout:
    """Each draft's k + 1 target positions, back to back."""
    return RowLayout.packed([k + 1 for k in ks])


def _index(values: Sequence[int], device: torch.device) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.long, device=device)


def greedy_accept(draft_tokens: Sequence[Sequence[int]], target_tokens: Sequence[Sequence[int]]) -> list[list[int]]:
    """Per row: the drafts that equal the target's greedy tokens, then the target's token at the
    first mismatch (or the bonus). `target_tokens[i]` has len(draft_tokens[i]) + 1 entries."""
    out = []
    for drafts, targets in zip(draft_tokens, target_tokens, strict=True):
        if len(targets) != len(drafts) + 1:
            raise ValueError(f"a row with {len(drafts)} drafts needs {len(drafts) + 1} target tokens, got {len(targets)}")
        a = 0
        while a < len(drafts) and drafts[a] == targets[a]:
            a += 1
        out.append(list(targets[: a + 1]))
    return out


def _check_drafts(draft_tokens: Sequence[Sequence[int]], draft_probs: Sequence[torch.Tensor | None] | None,
                  vocab: int) -> None:
    for i, d in enumerate(draft_tokens):
        if any(not 0 <= t < vocab for t in d):
            raise ValueError(f"row {i}: draft token out of [0, {vocab}): {list(d)}")
        q = draft_probs[i] if draft_probs is not None else None
        if q is not None and tuple(q.shape) != (len(d), vocab):
            raise ValueError(f"row {i}: draft_probs must be [{len(d)}, {vocab}], got {tuple(q.shape)}")


def rejection_sample(
    draft_tokens: Sequence[Sequence[int]],
    target_probs: torch.Tensor,
    draft_probs: Sequence[torch.Tensor | None] | None = None,
    generators: Sequence[torch.Generator | None] | None = None,
    greedy: Sequence[bool] | None = None,
) -> list[list[int]]:
    """Verify a batch of drafts; returns per row the accepted drafts plus one emitted token.

    draft_tokens: per row k_i >= 0 token ids.
    target_probs: [sum(k_i + 1), V] target probabilities, each row's k_i + 1 positions
        consecutive, after the same processing normal sampling applies (`probs_for`).
    draft_probs: per row None (deterministic: one-hot) or [k_i, V] draft distributions.
    generators: per row the request's generator or None (global RNG).
    greedy: per row whether it is greedy (argmax chain, no randomness); default all sampled.
    """
    batch = len(draft_tokens)
    ks = [len(d) for d in draft_tokens]
    layout = _layout(ks)
    if target_probs.dim() != 2 or target_probs.shape[0] != layout.num_rows:
        raise ValueError(f"target_probs must be [{layout.num_rows}, V] for drafts of lengths {ks}; "
                         f"got {tuple(target_probs.shape)}")
    for name, seq in (("draft_probs", draft_probs), ("generators", generators), ("greedy", greedy)):
        if seq is not None and len(seq) != batch:
            raise ValueError(f"{name} has {len(seq)} rows, draft_tokens {batch}")
    _check_drafts(draft_tokens, draft_probs, target_probs.shape[1])

    out: list[list[int]] = [[] for _ in range(batch)]
    greedy_rows = [i for i in range(batch) if greedy is not None and greedy[i]]
    sampled_rows = [i for i in range(batch) if greedy is None or not greedy[i]]
    if greedy_rows:
        positions = layout.rows(greedy_rows)
        rows = target_probs.index_select(0, _index(positions, target_probs.device))
        # max(dim) returns the first maximal index: the same tie rule as the greedy sampler.
        flat = rows.max(dim=-1).indices.tolist()
        targets, at = [], 0
        for i in greedy_rows:
            targets.append(flat[at: at + ks[i] + 1])
            at += ks[i] + 1
        for i, tokens in zip(greedy_rows, greedy_accept([draft_tokens[i] for i in greedy_rows], targets)):
            out[i] = tokens
    if sampled_rows:
        drawn = _sample_rows(
            [list(draft_tokens[i]) for i in sampled_rows],
            target_probs,
            [layout.first[i] for i in sampled_rows],
            [draft_probs[i] if draft_probs is not None else None for i in sampled_rows],
            [generators[i] if generators is not None else None for i in sampled_rows],
        )
        for i, emitted in zip(sampled_rows, drawn):
            out[i] = emitted
    return out


def _draw_rows(w: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF draw of one token per row of weights w [R, V] with uniforms u [R] — the normal
    sampler's `draw_tokens`; a plain cumsum when the vocabulary is smaller than its block (tests)."""
    if w.shape[1] > DRAW_BLOCK:
        return draw_tokens(w, u)
    cdf = w.double().cumsum(dim=-1)
    total = cdf[:, -1:].contiguous()
    # The first token whose CDF exceeds u * total; never a zero-weight one, even when u * total
    # rounds up to total (clamped to the last token with weight).
    return torch.minimum(
        torch.searchsorted(cdf, u.to(torch.float64).unsqueeze(1) * total, right=True),
        torch.searchsorted(cdf, total, right=False),
    ).squeeze(1)


def _uniforms(generators: Sequence[torch.Generator | None], ks: Sequence[int], width: int) -> torch.Tensor:
    """[S, width] float64 uniforms on the CPU: row s uses its first k_s + 1, drawn from its own
    generator when it has one (exactly k_s + 1 numbers), else from the global RNG."""
    u = torch.zeros(len(ks), width, dtype=torch.float64)
    unseeded = [s for s, g in enumerate(generators) if g is None]
    if unseeded:
        u[unseeded] = torch.rand(len(unseeded), width, dtype=torch.float64)
    for s, g in enumerate(generators):
        if g is not None:
            u[s, : ks[s] + 1] = torch.rand(ks[s] + 1, dtype=torch.float64, generator=g, device=g.device).cpu()
    return u


def _sample_rows(
    drafts: list[list[int]],
    target_probs: torch.Tensor,
    starts: list[int],
    draft_probs: list[torch.Tensor | None],
    generators: list[torch.Generator | None],
    row_sums: torch.Tensor | None = None,
) -> list[list[int]]:
    """Sampled rows. With `row_sums`, `target_probs` holds the sampler's unnormalised weights
    and p = weights / row_sums is formed only where it is read (the drafted entries and the
    final rows): the same float32 values as probs_for, without a normalised [R, V] copy."""
    dev = target_probs.device
    rows = len(drafts)
    ks = [len(d) for d in drafts]
    width = max(ks)
    u = _uniforms(generators, ks, width + 1).to(dev)

    accepted = [0] * rows
    q_all: torch.Tensor | None = None       # the rows' q stacked: [sum k over rows with q, V]
    final_q: torch.Tensor | None = None     # [rows] q_all row of each row's final position; -1: one-hot
    if width:
        # Flattened (row, position) pairs of every draft token.
        rr = [s for s in range(rows) for _ in range(ks[s])]
        jj = [j for s in range(rows) for j in range(ks[s])]
        r_t, j_t = _index(rr, dev), _index(jj, dev)
        x_t = _index([t for d in drafts for t in d], dev)
        pos_t = _index([starts[s] + j for s, j in zip(rr, jj)], dev)
        p_x = target_probs[pos_t, x_t]
        if row_sums is not None:
            p_x = p_x / row_sums[pos_t]
        p_x = p_x.double()
        # q_row: each pair's row in q_all, -1 for one-hot (no q, or q(x) == 0).
        with_q = [(s, q) for s, q in enumerate(draft_probs) if q is not None and ks[s]]
        q_row = torch.full((len(rr),), -1, dtype=torch.long, device=dev)
        q_x = torch.ones_like(p_x)
        if with_q:
            q_all = torch.cat([q.to(dev) for _, q in with_q])
            flat_start = [0]
            for k in ks:
                flat_start.append(flat_start[-1] + k)
            pair_of_q = _index([p for s, _ in with_q for p in range(flat_start[s], flat_start[s + 1])], dev)
            q_row[pair_of_q] = torch.arange(q_all.shape[0], device=dev)
            q_x[pair_of_q] = q_all[torch.arange(q_all.shape[0], device=dev), x_t[pair_of_q]].double()
            # q(x) == 0: verify that position as a one-hot draft (lossless given x).
            q_row = torch.where(q_x > 0, q_row, torch.full_like(q_row, -1))
            q_x = torch.where(q_x > 0, q_x, torch.ones_like(q_x))
        # Accept x with probability min(1, p/q): u < p/q, written u*q < p (no division by q).
        ok = u[r_t, j_t] * q_x < p_x
        grid = torch.zeros(rows, width, dtype=torch.long, device=dev)
        grid[r_t, j_t] = ok.long()
        acc_t = grid.cumprod(dim=1).sum(dim=1)
        accepted = acc_t.tolist()
        # The q row of each row's first rejected pair (rows that accepted everything: unused).
        q_grid = torch.full((rows, width + 1), -1, dtype=torch.long, device=dev)
        q_grid[r_t, j_t] = q_row
        final_q = q_grid.gather(1, acc_t.unsqueeze(1)).squeeze(1)

    final_pos = _index([starts[s] + accepted[s] for s in range(rows)], dev)
    weights = target_probs.index_select(0, final_pos).float()
    if row_sums is not None:
        weights /= row_sums.index_select(0, final_pos).unsqueeze(1)
    rejected = [s for s in range(rows) if accepted[s] < ks[s]]
    if rejected:
        assert final_q is not None      # some row had drafts
        idx = _index(rejected, dev)
        p_rows = weights.index_select(0, idx)
        q_rows = torch.zeros_like(p_rows)
        fq = final_q.index_select(0, idx)
        has_q = fq >= 0
        if q_all is not None and bool(has_q.any()):
            q_rows[has_q] = q_all[fq[has_q]].to(q_rows.dtype)
        # One-hot drafts: q is 1 at x, so the residual is p without x.
        x_rej = _index([drafts[s][accepted[s]] for s in rejected], dev)
        onehot = (~has_q).nonzero().flatten()
        q_rows[onehot, x_rej[onehot]] = 1.0
        residual = (p_rows - q_rows).clamp_min_(0.0)
        has_mass = residual.sum(dim=-1, keepdim=True) > 0
        weights.index_copy_(0, idx, torch.where(has_mass, residual, p_rows))
    last_u = u[torch.arange(rows, device=dev), _index(ks, dev)]
    final = _draw_rows(weights, last_u).tolist()
    return [drafts[s][: accepted[s]] + [final[s]] for s in range(rows)]


# ---- the engine's entry point -------------------------------------------------------------------


@dataclass(slots=True)
class VerifyRow:
    """One speculating request in a verification batch."""
    params: SamplingParams
    prompt_ids: Sequence[int]
    output_ids: Sequence[int]                 # committed output only (drafts excluded)
    draft_tokens: Sequence[int]               # k >= 0 drafts; k + 1 logits rows in the batch
    draft_probs: torch.Tensor | None = None   # [k, V] or None (deterministic draft)
    generator: torch.Generator | None = None


@dataclass(slots=True)
class VerifyResult:
    token_ids: list[int]                       # accepted drafts + the bonus/corrected token (1..k+1)
    logprobs: list[TokenLogprobs] | None       # per emitted token, when params.logprobs is set

    @property
    def num_accepted(self) -> int:
        return len(self.token_ids) - 1


class SpeculativeVerifier:
    """Target logits of speculating rows -> emitted tokens, with normal sampling's processing.

    `logits` is [sum(k_i + 1), V] float: row i's k_i + 1 positions consecutive, position j
    being the target's prediction after the committed tokens and drafts[:j] (guide masks, when
    any, already applied per position). Position j's penalties see output_ids + drafts[:j],
    exactly what normal sampling would see had those drafts been generated one by one.
    Greedy rows go through the normal `Sampler` (argmax, no randomness); sampled rows through
    `probs_for`'s pipeline and the rejection sampler. Logprobs are of the raw logits, as in
    normal sampling.

    Raises NoValidTokenError with *row* indices (into `rows`) when some rows have no valid
    token at some position; no generator has been advanced then, so the engine can fail
    those rows and verify the others again.
    """

    def __init__(self, sampler: Sampler | None = None) -> None:
        self.sampler = sampler or Sampler()

    def __call__(self, logits: torch.Tensor, rows: Sequence[VerifyRow]) -> list[VerifyResult]:
        ks = [len(r.draft_tokens) for r in rows]
        layout = _layout(ks)
        if logits.dim() != 2 or logits.shape[0] != layout.num_rows:
            raise ValueError(f"logits must be [{layout.num_rows}, V] for drafts of lengths {ks}; got {tuple(logits.shape)}")
        if not rows:
            return []
        _check_drafts([r.draft_tokens for r in rows], [r.draft_probs for r in rows], logits.shape[1])
        dev = logits.device
        greedy = [i for i, r in enumerate(rows) if r.params.greedy]
        sampled = [i for i, r in enumerate(rows) if not r.params.greedy]

        def positions(which: list[int]) -> list[int]:
            return layout.rows(which)

        def requests(which: list[int]) -> list[SampleRequest]:
            reqs = []
            for i in which:
                r = rows[i]
                penalised = r.params.has_penalty
                for j in range(ks[i] + 1):
                    out = list(r.output_ids) + list(r.draft_tokens[:j]) if penalised and j else r.output_ids
                    reqs.append(SampleRequest(r.params, r.prompt_ids, out))
            return reqs

        def take(pos: list[int]) -> torch.Tensor:
            return logits if len(pos) == logits.shape[0] else logits.index_select(0, _index(pos, dev))

        def row_of(which: list[int], pos_rows: list[int]) -> set[int]:
            owner = [i for i in which for _ in range(ks[i] + 1)]
            return {owner[p] for p in pos_rows}

        bad: set[int] = set()
        greedy_tokens: list[int] = []
        greedy_lps: list[TokenLogprobs | None] = []
        if greedy:
            try:
                greedy_tokens, greedy_lps = self.sampler(take(positions(greedy)), requests(greedy))
            except NoValidTokenError as exc:
                bad |= row_of(greedy, exc.rows)
        weights: torch.Tensor | None = None
        if sampled:
            try:
                # probs_for's pipeline (penalties, temperature, top-k/p, min-p) on the sampler's
                # scratch buffers; p = weights / row sum, formed where read (see _sample_rows).
                weights = self.sampler.sampling_weights(take(positions(sampled)), requests(sampled))
            except NoValidTokenError as exc:
                bad |= row_of(sampled, exc.rows)
        if bad:
            raise NoValidTokenError(sorted(bad))   # before any generator is used

        emitted: dict[int, list[int]] = {}
        logprobs: dict[int, list[TokenLogprobs]] = {}
        at = 0
        for i in greedy:
            emitted[i] = greedy_accept([rows[i].draft_tokens], [greedy_tokens[at: at + ks[i] + 1]])[0]
            if rows[i].params.logprobs is not None:
                logprobs[i] = [lp for lp in greedy_lps[at: at + len(emitted[i])] if lp is not None]
            at += ks[i] + 1
        if weights is not None:
            drawn = _sample_rows(
                [list(rows[i].draft_tokens) for i in sampled],
                weights,
                _layout([ks[i] for i in sampled]).first,
                [rows[i].draft_probs for i in sampled],
                [rows[i].generator for i in sampled],
                row_sums=weights.sum(dim=-1),
            )
            emitted.update(zip(sampled, drawn))
            wanted = [i for i in sampled if rows[i].params.logprobs is not None]
            if wanted:
                # Logprobs of the raw logits at each emitted position, as normal sampling reports.
                pos = [layout.first[i] + j for i in wanted for j in range(len(emitted[i]))]
                reqs = [SampleRequest(rows[i].params, (), ()) for i in wanted for _ in emitted[i]]
                chosen = _index([t for i in wanted for t in emitted[i]], dev)
                lps = token_logprobs(logits.index_select(0, _index(pos, dev)), reqs, chosen)
                at = 0
                for i in wanted:
                    logprobs[i] = [lp for lp in lps[at: at + len(emitted[i])] if lp is not None]
                    at += len(emitted[i])
        return [VerifyResult(emitted[i], logprobs.get(i)) for i in range(len(rows))]
