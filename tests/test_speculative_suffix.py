"""Suffix decoding and adaptive k: the tree's counts equal a brute-force count of substrings,
removal restores it exactly, drafts follow the most frequent continuation, the shared store is
bounded and keeps salts apart; the cost model interpolates and best_k picks plain decoding when
drafts cannot pay; in the engine, suffix speculation gives the greedy tokens of no speculation
and learns a repeated output shape across requests."""
from __future__ import annotations

import random
from collections import Counter

import pytest

from decoding.sampling import SamplingParams
from decoding.speculative import ProposeContext, SuffixProposer, SuffixTree
from decoding.speculative.adaptive import PROBES, StepCost, best_k, expected_tokens
from service.llm import LLM


def _counts(tree: SuffixTree) -> Counter:
    out: Counter = Counter()
    stack = [((), tree.root)]
    while stack:
        path, node = stack.pop()
        if path:
            out[path] = node.count
        for t, child in (node.children or {}).items():
            stack.append((path + (t,), child))
    return out


def _brute(seqs: list[list[int]], depth: int) -> Counter:
    out: Counter = Counter()
    for s in seqs:
        for end in range(1, len(s) + 1):
            for n in range(1, min(depth, end) + 1):
                out[tuple(s[end - n:end])] += 1
    return out


def test_tree_counts_every_substring_and_removal_restores_it() -> None:
    rng = random.Random(0)
    seqs = [[rng.randrange(6) for _ in range(rng.randrange(1, 40))] for _ in range(8)]
    tree = SuffixTree(depth=5)
    for s in seqs:
        tree.add(s)
    assert _counts(tree) == _brute(seqs, 5)
    assert tree.num_nodes == len(_brute(seqs, 5))
    for s in seqs[:5]:
        tree.remove(s)
    assert _counts(tree) == _brute(seqs[5:], 5)
    assert tree.num_nodes == len(_brute(seqs[5:], 5))


def test_draft_follows_the_most_frequent_continuation() -> None:
    tree = SuffixTree(depth=8)
    for _ in range(3):
        tree.add([1, 2, 3, 4, 5, 6])
    tree.add([1, 2, 3, 9, 9])
    tokens, score, conf = tree.draft([7, 1, 2, 3], k=5)
    assert tokens == [4, 5, 6] and score == pytest.approx(0.75 * 3) and conf == [0.75, 1.0, 1.0]
    assert tree.draft([8, 8], k=3) == ([], 0.0, [])
    # A long draft re-anchors past the depth on the text it drafted.
    loop = SuffixTree(depth=3)
    loop.add([5, 6, 7] * 6)
    assert loop.draft([5, 6], k=7)[0] == [7, 5, 6, 7, 5, 6, 7]


def test_shared_store_is_bounded_and_keeps_salts_apart() -> None:
    p = SuffixProposer(k=4, max_global_tokens=30)
    shape = [100, 101, 102, 103, 104, 105]
    p.complete("a", [1, 2] + shape, 2, "tenant-a")
    ctx = lambda salt: ProposeContext("new", [9, 100, 101], 2, 4, cache_salt=salt)  # noqa: E731
    assert p.propose([ctx("tenant-a")]) == [[102, 103, 104, 105]]
    assert p.propose([ctx("tenant-b")]) == [[]]     # nothing crosses salts
    for i in range(10):
        p.complete(f"x{i}", [1] + [200 + i] * 5, 1, "tenant-b")
    assert p.shared.num_tokens <= 30
    assert p.propose([ctx("tenant-a")]) == [[]]     # the oldest output was evicted
    assert p.memory()["shared_nodes"] == sum(t.num_nodes for t in p.shared.trees.values())


def test_cost_model_interpolates_and_best_k_declines_what_cannot_pay() -> None:
    cost = StepCost(min_samples=3)
    assert best_k(0.9, 4, cost) == 4        # nothing measured: try, and measure
    cost.observe(9, 500.0)                  # a first step that paid for a warm-up ...
    for rows, t in ((1, 10.0), (5, 14.0), (9, 40.0)) * 3:
        cost.observe(rows, t)
    assert cost.time(9) == 40.0             # ... is outvoted by the median
    assert cost.time(3) == pytest.approx(12.0) and cost.time(20) == 40.0
    assert best_k(0.9, 8, cost) == 4        # up to 5 rows is cheap, then steps get dear
    assert best_k(0.05, 8, cost) == 0       # drafts rarely accepted: plain decoding
    cost.observe(7, 90.0)                   # one sample is not enough to rule 7 rows out:
    assert cost.time(7) == 14.0             # it costs what 5 rows cost until measured again
    assert best_k(0.9, 8, cost) == 6
    assert expected_tokens(0.5, 2) == pytest.approx(1.75) == expected_tokens([0.5, 0.5, 0.9], 2)
    assert best_k([1.0, 1.0, 1.0, 0.0, 0.0], 5, cost) == 3   # a proposer sure of 3 tokens only


def test_best_k_measures_the_plain_step_before_weighing_a_draft_models_drafts() -> None:
    """Only 5-row steps measured (a proposer that always drafted 4): a 1-row step is not known
    to be cheaper, so a draft model is asked for nothing until it is measured, then weighed
    honestly. Assumed to cost what 5 rows cost, a plain step made a draft model as dear as the
    target look nearly free, and it kept drafting."""
    cost = StepCost(min_samples=3)
    for _ in range(3):
        cost.observe(5, 16.0)
    assert best_k(1.0, 4, cost, draft_s_per_token=10.0, probe_plain=True) == 0   # 1 row: unmeasured
    assert best_k(1.0, 4, cost, draft_s_per_token=10.0) == 4                     # a lookup tries
    assert best_k(0.9, 4, cost, other_rows=4, probe_plain=True) == 4             # 5 rows: known
    asked = 1 + sum(best_k(1.0, 4, cost, probe_plain=True) == 0 for _ in range(40))
    assert asked == PROBES   # bounded: a step that never comes as asked does not stop drafting
    for _ in range(3):
        cost.observe(1, 10.0)
    kw = dict(draft_s_per_token=10.0, probe_plain=True)
    assert best_k(1.0, 4, cost, **kw) == 0   # 5 tokens for 56 ms: not 5 for 50
    assert best_k(1.0, 4, cost, probe_plain=True) == 4   # free drafts: 5 tokens for 16 ms


def _greedy(n: int = 24, **kw) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=n, ignore_eos=True, **kw)


def test_engine_suffix_speculation_is_exact_and_learns_across_requests(tiny_llama) -> None:
    rng = random.Random(5)
    prompts = [[rng.randrange(1000, 40000) for _ in range(12)] * 3 for _ in range(3)]
    plain = LLM(str(tiny_llama), dtype="float32", num_blocks=256, progress=False)
    expect = [r.outputs[0].token_ids for r in plain.generate(prompts, _greedy())]
    llm = LLM(str(tiny_llama), dtype="float32", num_blocks=256, progress=False, speculative_method="suffix",
              num_speculative_tokens=4)
    got = [r.outputs[0].token_ids for r in llm.generate(prompts, _greedy())]
    assert got == expect
    # The same request again: its earlier output is in the shared store, so drafts follow it.
    before = llm.engine.spec.tracker.aggregate.num_accepted_tokens
    [again] = llm.generate([prompts[1]], _greedy())
    assert again.outputs[0].token_ids == expect[1]
    assert again.outputs[0].spec["num_accepted_tokens"] >= 12
    assert llm.engine.spec.tracker.aggregate.num_accepted_tokens > before
    assert llm.engine.pool_is_whole()
    memory = llm.engine.stats().spec_memory   # what /metrics reports as weft_spec_decode_proposer_memory
    assert memory["shared_tokens"] == 4 * 24 and memory["shared_nodes"] > 0


def test_best_k_counts_the_rows_a_request_brings_besides_its_draft() -> None:
    cost = StepCost(min_samples=1)
    for rows, t in ((1, 10.0), (12, 12.0), (16, 13.0), (17, 60.0)):
        cost.observe(rows, t)
    assert best_k(0.9, 8, cost) == 8                  # 1 + 8 rows: cheap
    assert best_k(0.9, 8, cost, own_rows=12) == 4     # a forced chunk of 12 leaves room for 4


def test_drafts_keep_a_forced_chunk_on_the_fast_path(tiny_llama) -> None:
    """A grammar forces a long literal after the first token (jump-forward), so the next step
    already computes ~13 rows for the request; a draft on top must not push it past the native
    loop's per-request row limit, past which the whole step runs the torch loop (measured ~4x
    dearer: what made suffix decoding lose on the agent bench)."""
    from decoding.guided import GuidedSpec
    spec = GuidedSpec("regex", "(x|y) the quick brown fox jumps over the lazy dog again[0-9]{24}")
    params = _greedy(40, guided=spec)
    prompt = [[1000 + i for i in range(6)]]
    plain = LLM(str(tiny_llama), dtype="float32", num_blocks=256, progress=False)
    [expect] = plain.generate(prompt, params)
    llm = LLM(str(tiny_llama), dtype="float32", num_blocks=256, progress=False, speculative_method="suffix",
              num_speculative_tokens=8)
    limit = llm.engine.runner.fast_path_max_queries()
    assert limit is not None   # float32 Llama on a CPU: the native loop is there
    rows: list[int] = []
    run = llm.engine.runner.run
    llm.engine.runner.run = lambda seqs: rows.extend(len(s.token_ids) for s in seqs) or run(seqs)
    llm.generate(prompt, params)                        # its output goes to the shared store ...
    [again] = llm.generate(prompt, params)              # ... and drafts the second run's digits
    assert again.outputs[0].token_ids == expect.outputs[0].token_ids
    assert again.outputs[0].spec["num_accepted_tokens"] >= 4
    assert max(rows[1:]) <= limit and max(rows) > 12   # a forced chunk ran, within the limit


def test_one_rejected_first_draft_does_not_turn_speculation_off_for_good() -> None:
    """The engine-wide acceptance is every new request's prior. As a raw ratio, a first draft
    rejected at its first token made it 0: no request drafted again, so no count could ever
    correct it (the chat bench's n-gram arm chose k = 0 for 299 of 300 proposals)."""
    from types import SimpleNamespace

    from decoding.sampling import Sampler
    from service.config import EngineConfig
    from service.engine.speculation import Speculator

    spec = Speculator(EngineConfig(speculative_method="ngram", num_speculative_tokens=8), Sampler(), [0], 1)
    for rows in range(1, 10):
        for _ in range(3):
            spec.observe_step(rows, 0.010 + 0.001 * rows)   # extra rows cost 10% of a step each
    spec.record(SimpleNamespace(request_id="first"), 8, 0)  # a first draft, rejected at once
    assert spec._best_k(SimpleNamespace(request_id="next"), 8, None, 0, 0, 0.0, 1) > 0
    for _ in range(200):                                    # many rejections: now it is the traffic
        spec.record(SimpleNamespace(request_id="poor"), 8, 0)
    assert spec._best_k(SimpleNamespace(request_id="next"), 8, None, 0, 0, 0.0, 1) == 0


def test_a_proposers_scores_are_scaled_by_how_well_they_predicted() -> None:
    """A suffix tree's frequencies are raw counts (a continuation seen once scores 1.0). The engine
    keeps the draft tokens accepted against the tokens the scores predicted, and scales new scores
    by that: after many sure-looking drafts that were mostly rejected, a new request's sure-looking
    draft is cut short; where such drafts were accepted, it is kept whole."""
    from types import SimpleNamespace

    from decoding.sampling import Sampler
    from service.config import EngineConfig
    from service.engine.speculation import Speculator

    def trained(accepted: int) -> Speculator:
        spec = Speculator(EngineConfig(speculative_method="suffix", num_speculative_tokens=8), Sampler(), [0], 1)
        for rows in range(1, 10):
            for _ in range(3):
                spec.observe_step(rows, 0.010 + 0.001 * rows)   # extra rows cost 10% of a step each
        for i in range(50):   # drafts of 8 tokens, each scored 1.0
            spec.record(SimpleNamespace(request_id=f"r{i}"), 8, accepted, [1.0] * 8)
        return spec

    sure = [1.0] * 8
    fresh = Speculator(EngineConfig(speculative_method="suffix", num_speculative_tokens=8), Sampler(), [0], 1)
    for rows in range(1, 10):
        for _ in range(3):
            fresh.observe_step(rows, 0.010 + 0.001 * rows)
    assert fresh._best_k(SimpleNamespace(request_id="next"), 8, sure, 0, 0, 0.0, 1) == 8
    assert trained(8)._best_k(SimpleNamespace(request_id="next"), 8, sure, 0, 0, 0.0, 1) == 8
    assert trained(1)._best_k(SimpleNamespace(request_id="next"), 8, sure, 0, 0, 0.0, 1) <= 1


def test_oracle_replay_counts_the_steps_a_perfect_k_would_take() -> None:
    """bench/spec_bound's oracle: a proposer that knows the output needs ceil(n / (k + 1)) steps,
    each priced by its rows; one that is always wrong needs a one-row step per token; a partly
    right draft is verified up to its first wrong token."""
    from bench.spec_bound import replay
    out = list(range(100, 120))
    cost = {r: float(r) for r in range(1, 6)}.__getitem__
    seq = [1, 2, 3] + out
    oracle = lambda rid, toks, n0, k: seq[len(toks):len(toks) + k]   # noqa: E731
    assert replay([1, 2, 3], out, oracle, "r", 4, cost) == (20.0, 4)   # 4 steps of 5 rows
    wrong = lambda rid, toks, n0, k: [0] * k   # noqa: E731
    assert replay([1, 2, 3], out, wrong, "r", 4, cost) == (20.0, 20)
    half = lambda rid, toks, n0, k: (seq[len(toks):len(toks) + 2] + [0] * k)[:k]   # noqa: E731
    seconds, steps = replay([1, 2, 3], out, half, "r", 4, cost)
    assert steps == 7 and seconds == 6 * 3.0 + 2.0   # 3 tokens a step, the last step 2 of them


def test_a_draft_after_a_whole_accepted_one_is_priced_by_what_follows_whole_ones() -> None:
    """Acceptance is counted in two states: after a draft accepted whole, and otherwise. A request
    that alternates copied runs (drafts accepted whole until the run ends) with stretches away
    from its source (drafts rejected at once) drafts long inside a run and not at all outside one;
    one rate over both (~0.7 here) would draft alike in both."""
    from types import SimpleNamespace

    from decoding.sampling import Sampler
    from service.config import EngineConfig
    from service.engine.speculation import Speculator

    spec = Speculator(EngineConfig(speculative_method="ngram", num_speculative_tokens=8), Sampler(), [0], 1)
    for rows in range(1, 10):
        for _ in range(3):
            spec.observe_step(rows, 0.010 + 0.005 * rows)   # extra rows cost a third of a step each
    req = SimpleNamespace(request_id="copier")
    for _ in range(20):
        for _ in range(10):
            spec.record(req, 4, 0)   # away from the source
        spec.record(req, 4, 4)       # a run starts ...
        for _ in range(5):
            spec.record(req, 4, 4)   # ... goes on ...
        spec.record(req, 4, 0)       # ... and ends
    assert spec._best_k(req, 8, None, 0, 0, 0.0, 1) == 0   # last draft rejected
    spec.record(req, 2, 2)
    assert spec._best_k(req, 8, None, 0, 0, 0.0, 1) >= 4   # last draft whole: a run goes on


def test_a_requests_own_record_scales_its_proposers_scores() -> None:
    """Scores are trusted engine-wide and per request: where the engine's traffic made a
    proposer's sure-looking drafts good (copying), a request whose own sure-looking drafts were
    all rejected (a chat turn after it) drafts little, while a new request still drafts long."""
    from types import SimpleNamespace

    from decoding.sampling import Sampler
    from service.config import EngineConfig
    from service.engine.speculation import Speculator

    spec = Speculator(EngineConfig(speculative_method="suffix", num_speculative_tokens=8), Sampler(), [0], 1)
    for rows in range(1, 10):
        for _ in range(3):
            spec.observe_step(rows, 0.010 + 0.002 * rows)
    for i in range(50):   # the engine's traffic: sure-looking drafts, accepted whole
        spec.record(SimpleNamespace(request_id=f"copy{i}"), 4, 4, [1.0] * 4)
    chat = SimpleNamespace(request_id="chat")
    for _ in range(4):
        spec.record(chat, 2, 0, [1.0] * 2)   # this request's: rejected at once
    sure = [1.0] * 8
    assert spec._best_k(SimpleNamespace(request_id="new"), 8, sure, 0, 0, 0.0, 1) >= 4
    assert spec._best_k(chat, 8, sure, 0, 0, 0.0, 1) <= 1   # engine-wide scores alone: 4 or more
