"""Continuous batching: a request's greedy output does not depend on what it is batched with,
how its prompt is chunked, or whether it was preempted; the block pool always comes back whole."""
from __future__ import annotations

import random

import pytest

from decoding.sampling import SamplingParams
from service.llm import LLM

GREEDY = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)


@pytest.fixture(scope="module")
def prompts(tiny_llama) -> list[list[int]]:
    rng = random.Random(7)
    lengths = [3, 250, 17, 64, 1, 129, 40, 90, 8, 200, 33, 16, 15, 77, 5, 160]  # mixed, incl. block edges
    return [[rng.randrange(1000, 40000) for _ in range(n)] for n in lengths]


def _engine(tiny_llama, **kw) -> LLM:
    return LLM(str(tiny_llama), dtype="float32", progress=False, **kw)


@pytest.fixture(scope="module")
def alone(tiny_llama, prompts) -> list[list[int]]:
    llm = _engine(tiny_llama, num_blocks=64)
    out = [llm.generate([p], GREEDY)[0].outputs[0].token_ids for p in prompts]
    assert llm.engine.pool_is_whole()
    return out


def _batched(llm: LLM, prompts, params=GREEDY) -> list[list[int]]:
    results = llm.generate(prompts, params)
    assert llm.engine.pool_is_whole()
    return [r.outputs[0].token_ids for r in results]


def test_batch_of_16_equals_alone(tiny_llama, prompts, alone) -> None:
    llm = _engine(tiny_llama, num_blocks=512)
    assert _batched(llm, prompts) == alone


def test_chunked_prefill_equals_alone(tiny_llama, prompts, alone) -> None:
    llm = _engine(tiny_llama, num_blocks=512, max_num_batched_tokens=24)
    assert _batched(llm, prompts) == alone
    assert llm.engine.scheduler.num_preemptions == 0


def test_preemption_equals_alone(tiny_llama, prompts, alone) -> None:
    # 40 blocks of 16 tokens cannot hold all 16 sequences: the scheduler must preempt and recompute.
    llm = _engine(tiny_llama, num_blocks=40, max_num_batched_tokens=64)
    assert _batched(llm, prompts) == alone
    assert llm.engine.scheduler.num_preemptions > 0


def test_max_num_seqs_limits_running(tiny_llama, prompts, alone) -> None:
    llm = _engine(tiny_llama, num_blocks=512, max_num_seqs=3)
    for p in prompts:
        llm.engine.add_request(f"r{len(llm.engine.requests)}", p, GREEDY)
    seen = 0
    while llm.engine.has_unfinished():
        llm.engine.step()
        seen = max(seen, llm.engine.num_running)
    assert seen == 3
    assert llm.engine.pool_is_whole()


def test_seeded_sampling_is_batch_invariant(tiny_llama, prompts) -> None:
    params = SamplingParams(temperature=0.9, top_p=0.95, max_tokens=16, seed=1234, ignore_eos=True)
    llm = _engine(tiny_llama, num_blocks=512)
    alone = llm.generate([prompts[2]], params)[0].outputs[0].token_ids
    others = SamplingParams(temperature=1.0, max_tokens=16, ignore_eos=True)
    batch = llm.generate(prompts[:6], [others, others, params, others, others, others])
    assert batch[2].outputs[0].token_ids == alone
    again = llm.generate([prompts[2]], params)[0].outputs[0].token_ids
    assert again == alone
    assert llm.engine.pool_is_whole()


def test_n_samples_and_logprobs(tiny_llama, prompts) -> None:
    llm = _engine(tiny_llama, num_blocks=512)
    params = SamplingParams(n=3, temperature=1.0, max_tokens=8, seed=5, logprobs=4, ignore_eos=True)
    res = llm.generate([prompts[3]], params)[0]
    assert [c.index for c in res.outputs] == [0, 1, 2]
    assert all(len(c.token_ids) == 8 for c in res.outputs)
    assert len({tuple(c.token_ids) for c in res.outputs}) > 1  # distinct seeds -> distinct samples
    for c in res.outputs:
        assert len(c.logprobs) == 8
        for tok, lp in zip(c.token_ids, c.logprobs):
            assert lp.token_id == tok and lp.logprob <= 0
            assert len(lp.top) == 4
            assert [x[1] for x in lp.top] == sorted((x[1] for x in lp.top), reverse=True)
    assert llm.engine.pool_is_whole()


def test_stop_string_and_length(tiny_llama) -> None:
    llm = _engine(tiny_llama, num_blocks=64)
    base = llm.generate(["hello there"], SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))[0].outputs[0]
    assert base.finish_reason == "length" and len(base.token_ids) == 12
    # Stop on a piece of the text the model produces anyway: the output is cut just before it.
    stop = base.text[len(base.text) // 2: len(base.text) // 2 + 3]
    if stop:
        cut = llm.generate(["hello there"], SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, stop=[stop]))
        out = cut[0].outputs[0]
        assert out.finish_reason == "stop" and out.stop_reason == stop
        assert out.text == base.text[: base.text.index(stop)]
    assert llm.engine.pool_is_whole()
