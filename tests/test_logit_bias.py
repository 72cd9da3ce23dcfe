"""logit_bias: the scatter against a direct loop; in the engine -100 bans a token (never sampled,
greedy or not), +100 forces it, a bias stays on its own row of a batch, speculation with a bias
gives the same greedy tokens as without speculation, and a guide's mask has the last word; over
HTTP with the official `openai` client on the real SmolLM2, with bad biases a 400 naming the field."""
from __future__ import annotations

import random

import openai
import pytest
import torch

from decoding.guided import GuidedSpec
from decoding.sampling import SamplingParams
from kernels.mask import apply_logit_bias_
from service.llm import LLM


def test_scatter_matches_a_loop_and_bans_with_minus_inf() -> None:
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 300, generator=g) * 50
    rows = torch.tensor([0, 0, 2, 3, 3, 3])
    tokens = torch.tensor([5, 299, 5, 0, 7, 150])
    bias = torch.tensor([1.5, -100.0, 100.0, -3.0, -100.0, 0.25])
    expect = logits.clone()
    for r, t, b in zip(rows.tolist(), tokens.tolist(), bias.tolist()):
        expect[r, t] = float("-inf") if b <= -100 else expect[r, t] + b
    apply_logit_bias_(logits, rows, tokens, bias)
    assert torch.equal(logits, expect)
    assert logits[0, 299] == float("-inf") and logits[3, 7] == float("-inf")


def _greedy(**kw) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=20, ignore_eos=True, **kw)


@pytest.fixture(scope="module")
def llm(tiny_llama) -> LLM:
    return LLM(str(tiny_llama), dtype="float32", num_blocks=256, progress=False)


@pytest.fixture(scope="module")
def prompts() -> list[list[int]]:
    rng = random.Random(3)
    base = [rng.randrange(1000, 40000) for _ in range(12)]
    # Repeating prompts, so that n-gram speculation finds drafts to verify.
    return [base * 4, [rng.randrange(1000, 40000) for _ in range(30)], base[:5] * 6]


def _ids(llm: LLM, prompts, params) -> list[list[int]]:
    out = [r.outputs[0].token_ids for r in llm.generate(prompts, params)]
    assert llm.engine.pool_is_whole()
    return out


def test_minus_100_bans_a_token_greedy_and_sampled(llm, prompts) -> None:
    [ref] = _ids(llm, [prompts[1]], _greedy())
    banned = ref[0]
    [out] = _ids(llm, [prompts[1]], _greedy(logit_bias={banned: -100.0}))
    assert out[0] != banned and banned not in out
    # Ban the most frequent tokens of the greedy output too: none of them comes back.
    many = {t: -100.0 for t in set(ref)}
    for seed in range(3):
        [sampled] = _ids(llm, [prompts[1]], SamplingParams(temperature=1.5, max_tokens=30, ignore_eos=True,
                                                           seed=seed, logit_bias=many))
        assert not set(sampled) & set(many)


def test_plus_100_forces_a_token_even_when_sampling(llm, prompts) -> None:
    forced = 4242
    [out] = _ids(llm, [prompts[0]], SamplingParams(temperature=1.0, max_tokens=16, ignore_eos=True, seed=1,
                                                   logit_bias={forced: 100.0}))
    assert out == [forced] * 16


def test_bias_stays_on_its_own_row(llm, prompts) -> None:
    plain = _ids(llm, prompts, _greedy())
    banned = plain[1][0]
    params = [_greedy(), _greedy(logit_bias={banned: -100.0}), _greedy()]
    mixed = _ids(llm, prompts, params)
    assert mixed[0] == plain[0] and mixed[2] == plain[2]
    assert banned not in mixed[1]


def test_speculation_with_a_bias_gives_the_same_greedy_tokens(tiny_llama, llm, prompts) -> None:
    plain = _ids(llm, prompts, _greedy())
    bias = {plain[0][3]: -100.0, plain[2][1]: -100.0, 777: 7.5}
    reference = _ids(llm, prompts, _greedy(logit_bias=bias))
    spec = LLM(str(tiny_llama), dtype="float32", num_blocks=256, progress=False,
               speculative_method="ngram", num_speculative_tokens=4)
    assert _ids(spec, prompts, _greedy(logit_bias=bias)) == reference
    assert spec.engine.spec.tracker.aggregate.num_draft_tokens > 0   # it did speculate


def test_the_guide_has_the_last_word(llm, prompts) -> None:
    choices = ["alpha", "beta", "gamma"]
    tok = llm.engine.tokenizer
    outside = tok.encode(" zebra")[-1]
    inside = tok.encode("beta")[0]
    for bias in ({outside: 100.0}, {inside: -100.0}):
        params = SamplingParams(temperature=0, max_tokens=8, guided=GuidedSpec("choice", choices), logit_bias=bias)
        [res] = llm.generate([prompts[1]], params)
        assert res.outputs[0].text in choices, res.outputs[0].text
        if inside in bias:
            assert res.outputs[0].token_ids[0] != inside


# ---- over HTTP: the official openai client ---------------------------------------------------


@pytest.fixture(scope="module")
def client(smollm2_served: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{smollm2_served}/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def model(client) -> str:
    return client.models.list().data[0].id


def _completion_ids(client, model, **kw) -> list[int]:
    resp = client.completions.create(model=model, prompt="The capital of France is", max_tokens=8,
                                     extra_body={"return_token_ids": True, "ignore_eos": True}, **kw)
    return resp.choices[0].model_extra["token_ids"]


def test_openai_client_bans_and_forces(client, model) -> None:
    ref = _completion_ids(client, model, temperature=0)
    banned = ref[0]
    out = _completion_ids(client, model, temperature=0, logit_bias={str(banned): -100})
    assert out[0] != banned and banned not in out
    forced = ref[-1] if ref[-1] != ref[0] else ref[0] + 1
    out = _completion_ids(client, model, temperature=1.0, seed=5, logit_bias={str(forced): 100})
    assert out == [forced] * 8
    chat = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "Say hello."}], max_tokens=6, temperature=1.0,
        seed=2, logit_bias={str(forced): 100}, extra_body={"return_token_ids": True, "ignore_eos": True})
    assert chat.choices[0].model_extra["token_ids"] == [forced] * 6


@pytest.mark.parametrize("bias,needle", [
    ({"hello": 1}, "keys must be token ids"),
    ({"49152": 1}, "[0, 49152)"),
    ({"5": 150}, "[-100, 100]"),
    ({str(t): 1 for t in range(301)}, "at most 300"),
])
def test_openai_client_bad_bias_is_400_naming_it(client, model, bias, needle) -> None:
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model=model, messages=[{"role": "user", "content": "hi"}], max_tokens=2,
                                       logit_bias=bias)
    body = err.value.body
    assert body["param"] == "logit_bias" and needle in body["message"], body
    # The server goes on serving.
    assert _completion_ids(client, model, temperature=0)
