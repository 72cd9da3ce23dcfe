"""The sampler against direct re-implementations: real tensors, no mocks."""
from __future__ import annotations

import itertools
import math

import pytest
import torch

from decoding.sampling import (
    GREEDY_TEMPERATURE,
    NoValidTokenError,
    Sampler,
    SampleRequest,
    SamplingParams,
    TokenLogprobs,
    probs_for,
)
from common.errors import InvalidArgumentError


def row(params: SamplingParams, prompt: list[int] | None = None, output: list[int] | None = None,
        seed: int | None = None) -> SampleRequest:
    gen = Sampler.make_generator(seed) if seed is not None else None
    return SampleRequest(params, prompt or [], output or [], gen)


# ---- validation ---------------------------------------------------------------------------------

BAD_PARAMS = [
    ({"n": 0}, "n"),
    ({"n": 17}, "n"),
    ({"n": 1.5}, "n"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"max_tokens": -1}, "max_tokens"),
    ({"temperature": -0.1}, "temperature"),
    ({"temperature": float("nan")}, "temperature"),
    ({"temperature": float("inf")}, "temperature"),
    ({"top_p": 0.0}, "top_p"),
    ({"top_p": 1.01}, "top_p"),
    ({"top_p": float("nan")}, "top_p"),
    ({"top_k": -2}, "top_k"),
    ({"top_k": 2.0}, "top_k"),
    ({"min_p": -0.01}, "min_p"),
    ({"min_p": 1.5}, "min_p"),
    ({"repetition_penalty": 0.0}, "repetition_penalty"),
    ({"repetition_penalty": -1.0}, "repetition_penalty"),
    ({"repetition_penalty": float("inf")}, "repetition_penalty"),
    ({"presence_penalty": 2.5}, "presence_penalty"),
    ({"presence_penalty": -2.01}, "presence_penalty"),
    ({"frequency_penalty": -3.0}, "frequency_penalty"),
    ({"frequency_penalty": float("nan")}, "frequency_penalty"),
    ({"stop": [""]}, "stop"),
    ({"stop": ["ok", 3]}, "stop"),
    ({"stop": "STOP"}, "stop"),
    ({"stop": [f"s{i}" for i in range(17)]}, "stop"),
    ({"stop_token_ids": [-1]}, "stop_token_ids"),
    ({"stop_token_ids": [100]}, "stop_token_ids"),   # vocab_size is 100 below
    ({"logprobs": -1}, "logprobs"),
    ({"logprobs": 21}, "logprobs"),
    ({"seed": -1}, "seed"),
    ({"seed": 2**63}, "seed"),
    ({"seed": 1.0}, "seed"),
    ({"ignore_eos": 1}, "ignore_eos"),
]


@pytest.mark.parametrize("kwargs,field", BAD_PARAMS, ids=[f"{f}={k[f]!r}"[:40] for k, f in BAD_PARAMS])
def test_validation_names_the_field(kwargs: dict, field: str) -> None:
    with pytest.raises(InvalidArgumentError) as info:
        SamplingParams(**kwargs).validate(vocab_size=100)
    assert info.value.field == field
    assert field in str(info.value)


def test_validation_accepts_edges() -> None:
    for params in [
        SamplingParams(),
        SamplingParams(n=16, temperature=0, top_k=-1, top_p=1.0, min_p=1.0, logprobs=20, seed=2**63 - 1),
        SamplingParams(top_k=0, min_p=0.0, presence_penalty=-2, frequency_penalty=2, repetition_penalty=0.5),
        SamplingParams(stop=["a"] * 16, stop_token_ids=[0, 99], logprobs=0, seed=0),
    ]:
        params.validate(vocab_size=100)
    SamplingParams(stop_token_ids=[10**6]).validate()   # no vocabulary given: only the sign is checked


def test_greedy_property() -> None:
    assert SamplingParams(temperature=0).greedy
    assert SamplingParams(temperature=GREEDY_TEMPERATURE / 2).greedy
    assert not SamplingParams(temperature=0.01).greedy


# ---- greedy -------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_greedy_is_argmax(dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    logits = torch.randn(16, 1000).to(dtype)
    tokens, lps = Sampler()(logits, [row(SamplingParams(temperature=0)) for _ in range(16)])
    assert tokens == logits.float().argmax(-1).tolist()
    assert lps == [None] * 16


def test_greedy_ties_go_to_lowest_id() -> None:
    logits = torch.zeros(3, 50)
    logits[0, [7, 3, 40]] = 5.0
    logits[1, [49, 48]] = 1.0
    logits[2] = float("-inf")
    logits[2, [30, 20]] = -100.0
    tokens, _ = Sampler()(logits, [row(SamplingParams(temperature=0)) for _ in range(3)])
    assert tokens == [3, 48, 20]


def test_caller_logits_are_not_modified() -> None:
    torch.manual_seed(1)
    logits = torch.randn(4, 300)
    before = logits.clone()
    params = SamplingParams(temperature=0.7, top_k=5, top_p=0.8, min_p=0.1, repetition_penalty=1.3,
                            presence_penalty=0.5, frequency_penalty=0.5, logprobs=3)
    rows = [row(params, [1, 2, 3], [4, 4, 5]) for _ in range(4)]
    Sampler()(logits, rows)
    probs_for(logits, rows)
    assert torch.equal(logits, before)


# ---- masks, filters, support ----------------------------------------------------------------------

# Every combination of options that changes the distribution; penalties include negative ones,
# which raise logits (they must still never raise a -inf).
OPTION_GRID = list(itertools.product(
    [0.0, 0.3, 1.0, 3.0],                # temperature
    [0, 2, 40],                          # top_k
    [1.0, 0.5],                          # top_p
    [0.0, 0.3],                          # min_p
    [(1.0, 0.0, 0.0), (0.5, -2.0, -2.0), (1.8, 2.0, 1.0)],   # repetition, presence, frequency
))


def test_masked_tokens_never_sampled_under_any_option() -> None:
    vocab = 64
    gen = torch.Generator().manual_seed(2)
    allowed_sets = []
    rows: list[SampleRequest] = []
    logits_rows = []
    for n, (temp, k, p, mp, (rep, pres, freq)) in enumerate(OPTION_GRID):
        allowed = torch.randperm(vocab, generator=gen)[: 1 + n % 7]
        logit = torch.randn(vocab, generator=gen) * 4
        # The masked tokens are the model's favourites: a filter that unmasks would pick them.
        logit += 20.0
        logit[allowed] -= 20.0
        masked = torch.full((vocab,), float("-inf"))
        masked[allowed] = logit[allowed]
        history = torch.randint(0, vocab, (12,), generator=gen).tolist()   # masked tokens included
        params = SamplingParams(temperature=temp, top_k=k, top_p=p, min_p=mp, repetition_penalty=rep,
                                presence_penalty=pres, frequency_penalty=freq)
        rows.append(row(params, history[:6], history[6:], seed=n if n % 2 else None))
        logits_rows.append(masked)
        allowed_sets.append(set(allowed.tolist()))
    logits = torch.stack(logits_rows)
    sampler = Sampler()
    for _ in range(40):
        tokens, _ = sampler(logits, rows)
        for tok, allowed in zip(tokens, allowed_sets):
            assert tok in allowed
    probs = probs_for(logits, rows)
    assert torch.all(probs[logits == float("-inf")] == 0)
    torch.testing.assert_close(probs.sum(-1), torch.ones(len(rows)))


def expected_support(logits: torch.Tensor, temperature: float, top_k: int, top_p: float, min_p: float) -> set[int]:
    """Direct float64 implementation: sort, cut by rank (top-k), cumulative mass (top-p), ratio (min-p)."""
    probs = torch.softmax(logits.double() / temperature, -1)
    order = torch.argsort(probs, descending=True).tolist()
    if 0 < top_k < len(order):
        order = order[:top_k]
    kept = probs[order] / probs[order].sum()
    if top_p < 1.0:
        mass_above = torch.cumsum(kept, 0) - kept
        n = int((mass_above < top_p).sum())
        order, kept = order[:n], kept[:n]
    if min_p > 0:
        order = [t for t, q in zip(order, kept.tolist()) if q >= min_p * kept.max().item()]
    return set(order)


def margin_ok(logits: torch.Tensor, temperature: float, top_p: float) -> bool:
    """True when no cumulative mass lies within 1e-4 of top_p (float32 rounding cannot flip the cut)."""
    if top_p >= 1.0:
        return True
    probs = torch.sort(torch.softmax(logits.double() / temperature, -1), descending=True).values
    return bool((torch.cumsum(probs, 0) - top_p).abs().min() > 1e-4)


@pytest.mark.parametrize("temperature,top_k,top_p,min_p", [
    (1.0, 5, 1.0, 0.0),
    (1.0, 0, 0.6, 0.0),
    (0.5, 0, 0.9, 0.0),
    (2.0, 0, 0.3, 0.0),
    (1.0, 0, 1.0, 0.2),
    (1.5, 0, 1.0, 0.05),
    (1.0, 8, 0.7, 0.0),
    (0.8, 10, 0.95, 0.3),
    (1.0, 1, 1.0, 0.0),
    (1.0, 0, 1.0, 1.0),
])
def test_filters_keep_exactly_the_right_support(temperature: float, top_k: int, top_p: float, min_p: float) -> None:
    vocab = 40
    gen = torch.Generator().manual_seed(3)
    cases = []
    while len(cases) < 4:
        logits = torch.randn(vocab, generator=gen) * 2
        if margin_ok(logits, temperature, top_p):
            cases.append(logits)
    params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p)
    sampler = Sampler()
    torch.manual_seed(3)
    for logits in cases:
        want = expected_support(logits, temperature, top_k, top_p, min_p)
        rows = [row(params)] * 3000
        batch = logits.expand(len(rows), vocab)
        got = set((probs_for(batch[:1], rows[:1])[0] > 0).nonzero().flatten().tolist())
        assert got == want
        drawn = set(sampler(batch, rows)[0])
        assert drawn <= want
        # With at most 8 kept tokens each has probability >= ~0.5%: 3000 draws see them all.
        if len(want) <= 8:
            assert drawn == want


def test_top_p_large_nucleus_falls_back_to_full_sort() -> None:
    """A near-flat distribution over 20k tokens: the nucleus is larger than every topk stage."""
    vocab = 20000
    gen = torch.Generator().manual_seed(4)
    logits = torch.randn(2, vocab, generator=gen) * 0.1
    params = SamplingParams(top_p=0.9)
    probs = probs_for(logits, [row(params), row(params)])
    for i in range(2):
        want = expected_support(logits[i], 1.0, 0, 0.9, 0.0)
        got = set((probs[i] > 0).nonzero().flatten().tolist())
        # float32 vs float64 mass can move the cut by a token or two among 18k.
        assert len(got ^ want) <= 2
        assert len(got) > 8192


def test_top_p_stages_in_one_batch() -> None:
    """Rows whose nucleus is found by the 64-candidate stage, a later stage and the full sort, in one
    batch, get the same cut as each row alone and as a direct computation."""
    vocab = 30000
    gen = torch.Generator().manual_seed(5)
    sharp = torch.randn(vocab, generator=gen) * 8
    middle = torch.randn(vocab, generator=gen) * 2.5
    flat = torch.randn(vocab, generator=gen) * 0.2
    logits = torch.stack([sharp, middle, flat])
    rows = [row(SamplingParams(top_p=0.95)) for _ in range(3)]
    together = probs_for(logits, rows)
    for i in range(3):
        alone = probs_for(logits[i:i + 1], rows[i:i + 1])[0]
        assert torch.equal(together[i] > 0, alone > 0)
        want = expected_support(logits[i], 1.0, 0, 0.95, 0.0)
        assert len(set((alone > 0).nonzero().flatten().tolist()) ^ want) <= 2
    sizes = (together > 0).sum(-1).tolist()
    assert sizes[0] <= 64 < sizes[1] and sizes[2] > 8192, sizes


def test_temperature_near_zero_concentrates_on_argmax() -> None:
    gen = torch.Generator().manual_seed(6)
    logits = torch.randn(64, 500, generator=gen) * 3
    top2 = logits.topk(2).values
    gap_ok = (top2[:, 0] - top2[:, 1]) > 0.05
    tokens, _ = Sampler()(logits, [row(SamplingParams(temperature=1e-3)) for _ in range(64)])
    best = logits.argmax(-1)
    for i in range(64):
        if gap_ok[i]:
            assert tokens[i] == best[i].item()
    # Below GREEDY_TEMPERATURE the row is greedy outright (no overflow to inf/NaN).
    tokens, _ = Sampler()(logits * 1e4, [row(SamplingParams(temperature=1e-7)) for _ in range(64)])
    assert tokens == (logits * 1e4).argmax(-1).tolist()


# ---- penalties ----------------------------------------------------------------------------------


def direct_penalties(logits: list[float], prompt: list[int], output: list[int], rep: float, pres: float,
                     freq: float) -> list[float]:
    """vLLM's formulas, one token at a time."""
    out = list(logits)
    for t in set(prompt) | set(output):
        out[t] = out[t] / rep if out[t] > 0 else out[t] * rep
    for t in set(output):
        out[t] -= freq * output.count(t) + pres
    return out


def test_penalties_match_direct_formula() -> None:
    vocab = 24
    gen = torch.Generator().manual_seed(7)
    cases = [
        (1.3, 0.0, 0.0), (0.7, 0.0, 0.0), (1.0, 0.8, 0.0), (1.0, 0.0, 0.6), (1.0, -1.5, -0.5),
        (2.0, 1.0, 2.0), (1.0, 0.0, 0.0),
    ]
    rows, logits_rows, expected = [], [], []
    for rep, pres, freq in cases:
        logits = (torch.randn(vocab, generator=gen) * 3).tolist()
        prompt = torch.randint(0, vocab, (9,), generator=gen).tolist()
        output = torch.randint(0, vocab, (7,), generator=gen).tolist() + [5, 5, 5]
        params = SamplingParams(repetition_penalty=rep, presence_penalty=pres, frequency_penalty=freq)
        rows.append(row(params, prompt, output))
        logits_rows.append(logits)
        expected.append(direct_penalties(logits, prompt, output, rep, pres, freq))
    logits = torch.tensor(logits_rows)
    want = torch.softmax(torch.tensor(expected, dtype=torch.float64), -1).float()
    torch.testing.assert_close(probs_for(logits, rows), want, rtol=1e-5, atol=1e-7)
    # Greedy rows see the same penalised logits; prompt/output given as tensors work too.
    greedy_rows = [SampleRequest(SamplingParams(temperature=0, repetition_penalty=r.params.repetition_penalty,
                                                presence_penalty=r.params.presence_penalty,
                                                frequency_penalty=r.params.frequency_penalty),
                                 torch.tensor(r.prompt_ids), torch.tensor(r.output_ids), None) for r in rows]
    tokens, _ = Sampler()(logits, greedy_rows)
    assert tokens == torch.tensor(expected).argmax(-1).tolist()


# ---- seeds and batch invariance -------------------------------------------------------------------


def run_steps(sampler: Sampler, steps: list[torch.Tensor], rows_for_step) -> list[list[int]]:
    return [sampler(logits, rows_for_step(i))[0] for i, logits in enumerate(steps)]


def test_seeded_row_same_alone_and_in_any_batch() -> None:
    vocab = 3000
    gen = torch.Generator().manual_seed(8)
    steps = [torch.randn(8, vocab, generator=gen) * 2 for _ in range(20)]
    target = SamplingParams(temperature=0.9, top_p=0.9, top_k=100, seed=1234)

    def alone(seed: int) -> list[int]:
        g = Sampler.make_generator(seed)
        out = []
        for logits in steps:
            out.append(Sampler()(logits[:1], [SampleRequest(target, [1, 2], [3], g)])[0][0])
        return out

    first = alone(1234)
    assert first == alone(1234)              # same seed, fresh generator: same tokens
    assert first != alone(4321)              # a different seed wanders elsewhere
    assert len(set(first)) > 5               # and it really samples

    # Now the same row inside batches of 8 with other rows of every kind.
    others = [
        SamplingParams(temperature=0),
        SamplingParams(seed=7),
        SamplingParams(temperature=1.3, top_p=0.5),
        SamplingParams(repetition_penalty=1.5, presence_penalty=0.5),
        SamplingParams(temperature=0.5, logprobs=5),
        SamplingParams(min_p=0.2, seed=99),
        SamplingParams(temperature=0, frequency_penalty=1.0),
    ]
    for order in (0, 3, 7):                  # position of the seeded row in the batch
        g = Sampler.make_generator(1234)
        other_gens = [Sampler.make_generator(p.seed) if p.seed is not None else None for p in others]
        sampler = Sampler()
        got = []
        for logits in steps:
            batch_rows = [SampleRequest(p, [1, 2, 3], [4, 5], og) for p, og in zip(others, other_gens)]
            batch_rows.insert(order, SampleRequest(target, [1, 2], [3], g))
            batch_logits = torch.cat([logits[1:order + 1], logits[:1], logits[order + 1:]])
            got.append(sampler(batch_logits, batch_rows)[0][order])
        assert got == first


def test_generator_advances_once_per_sampled_token_only() -> None:
    g = Sampler.make_generator(42)
    ref = Sampler.make_generator(42)
    logits = torch.randn(1, 100)
    Sampler()(logits, [SampleRequest(SamplingParams(temperature=0), [], [], g)])     # greedy: no draw
    assert torch.equal(g.get_state(), ref.get_state())
    Sampler()(logits, [SampleRequest(SamplingParams(), [], [], g)])
    torch.rand((), dtype=torch.float64, generator=ref)
    assert torch.equal(g.get_state(), ref.get_state())


# ---- the distribution ---------------------------------------------------------------------------


def chi_square(counts: torch.Tensor, probs: torch.Tensor) -> float:
    expected = probs * counts.sum()
    keep = expected > 0
    assert counts[~keep].sum() == 0
    return float(((counts[keep] - expected[keep]) ** 2 / expected[keep]).sum())


# Chi-square thresholds far in the tail (p < 1e-6 for these degrees of freedom): a correct
# sampler fails them essentially never, a biased one (off by a few percent) always.
@pytest.mark.parametrize("vocab,params", [
    (6, SamplingParams()),
    (6, SamplingParams(temperature=0.6)),
    (600, SamplingParams(temperature=1.0, top_k=9)),           # two full draw blocks and a tail block
    (700, SamplingParams(temperature=1.2, top_p=0.8, min_p=0.05)),
])
def test_frequencies_match_probs(vocab: int, params: SamplingParams) -> None:
    gen = torch.Generator().manual_seed(9)
    logits = torch.full((vocab,), float("-inf"))
    hot = torch.tensor(sorted({i for i in (0, 1, 2, 3, 4, 5, 255, 256, 300, 511, 512, vocab - 1) if i < vocab}))
    logits[hot] = torch.randn(len(hot), generator=gen)
    logits[hot[:2]] += 1.0
    n = 20000
    rows = [row(params) for _ in range(n)]
    probs = probs_for(logits.unsqueeze(0), rows[:1])[0].double()
    torch.manual_seed(10)
    tokens = torch.tensor(Sampler()(logits.expand(n, vocab), rows)[0])
    counts = torch.bincount(tokens, minlength=vocab).double()
    support = int((probs > 0).sum())
    stat = chi_square(counts, probs)
    assert stat < 15 + 4 * support, (stat, support)


def test_seeded_draws_follow_the_distribution() -> None:
    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0, float("-inf")]])
    g = Sampler.make_generator(11)
    sampler = Sampler()
    tokens = [sampler(logits, [SampleRequest(SamplingParams(), [], [], g)])[0][0] for _ in range(4000)]
    counts = torch.bincount(torch.tensor(tokens), minlength=6).double()
    assert chi_square(counts, torch.softmax(logits[0].double(), -1)) < 35


def test_probs_for_rows_sum_to_one_and_greedy_is_one_hot() -> None:
    torch.manual_seed(12)
    logits = torch.randn(6, 3000)
    params = [SamplingParams(), SamplingParams(temperature=0), SamplingParams(top_k=3),
              SamplingParams(top_p=0.5, temperature=0.3), SamplingParams(min_p=0.5),
              SamplingParams(temperature=0, repetition_penalty=2.0)]
    rows = [row(p, [1, 2], [int(logits[5].float().argmax())]) for p in params]
    probs = probs_for(logits, rows)
    assert probs.dtype == torch.float32
    torch.testing.assert_close(probs.sum(-1), torch.ones(6))
    assert probs[1].max() == 1.0 and int(probs[1].argmax()) == int(logits[1].float().argmax())
    assert (probs[2] > 0).sum() == 3
    assert (probs[5] == 1.0).sum() == 1
    assert int(probs[5].argmax()) != int(logits[5].float().argmax())   # the penalty moved it
    # bfloat16 logits are computed in float32.
    half = logits.to(torch.bfloat16)
    assert torch.equal(probs_for(half, rows), probs_for(half.float(), rows))


def test_no_valid_token_is_reported_per_row() -> None:
    logits = torch.randn(4, 10)
    logits[1] = float("-inf")
    logits[3] = float("-inf")
    rows = [row(SamplingParams()), row(SamplingParams()), row(SamplingParams()), row(SamplingParams(temperature=0))]
    with pytest.raises(NoValidTokenError) as info:
        Sampler()(logits, rows)
    assert info.value.rows == [1, 3]
    with pytest.raises(NoValidTokenError) as info:
        Sampler()(logits[:3], rows[:3])
    assert info.value.rows == [1]


def test_empty_batch() -> None:
    assert Sampler()(torch.empty(0, 10), []) == ([], [])


# ---- logprobs -----------------------------------------------------------------------------------


def test_a_rows_logprobs_do_not_depend_on_the_batch() -> None:
    """A speculative verify step scores several rows of one request at once; each row's logprobs
    must equal what a step of that row alone reports, bit for bit. A vocabulary as wide as the
    default model's (torch splits one long row's sum over threads) and one with a remainder."""
    torch.manual_seed(3)
    for vocab in (49152, 49152 + 37):
        # Normalised logits: logsumexp ~0, whose float32 ulp is fine enough to show a sum's order.
        logits = torch.log_softmax(torch.randn(9, vocab) * 3, -1)
        rows = [row(SamplingParams(logprobs=2, temperature=0)) for _ in range(9)]
        tokens, batch = Sampler()(logits, rows)
        for i in range(9):
            alone_tokens, alone = Sampler()(logits[i:i + 1].clone(), rows[i:i + 1])
            assert alone_tokens == [tokens[i]] and alone[0] == batch[i], (vocab, i)


def test_logprobs_are_raw_log_softmax_with_sorted_top() -> None:
    torch.manual_seed(13)
    logits = torch.randn(5, 400) * 3
    params = [
        SamplingParams(logprobs=5, temperature=0.5, repetition_penalty=1.5, top_k=20),
        SamplingParams(logprobs=0),
        SamplingParams(logprobs=20, temperature=0),
        SamplingParams(),
        SamplingParams(logprobs=3, presence_penalty=2.0, min_p=0.1),
    ]
    rows = [row(p, [1, 2, 3], [4, 5]) for p in params]
    tokens, lps = Sampler()(logits, rows)
    raw = torch.log_softmax(logits.double(), -1)
    assert lps[3] is None
    for i in (0, 1, 2, 4):
        lp = lps[i]
        assert isinstance(lp, TokenLogprobs)
        assert lp.token_id == tokens[i]
        assert math.isclose(lp.logprob, raw[i, tokens[i]].item(), abs_tol=1e-4)
        k = params[i].logprobs
        assert len(lp.top) == k
        want = raw[i].topk(k) if k else None
        if k:
            assert [t for t, _ in lp.top] == want.indices.tolist()
            assert all(math.isclose(v, w, abs_tol=1e-4) for (_, v), w in zip(lp.top, want.values.tolist()))
            values = [v for _, v in lp.top]
            assert values == sorted(values, reverse=True)
