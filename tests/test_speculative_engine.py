"""Speculative decoding in the engine: greedy output identical with and without it (n-gram and
draft-model proposers; alone, batched, chunked, preempted, guided), the target as its own draft
accepts nearly everything, seeded sampling stays reproducible, pools come back whole."""
from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import jsonschema
import pytest

from decoding.guided import GuidedSpec
from decoding.sampling import SamplingParams
from common.errors import InvalidArgumentError, ModelLoadError
from service.llm import LLM

K = 4


def _greedy(max_tokens: int = 24, **kw) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True, **kw)


@pytest.fixture(scope="module")
def prompts() -> list[list[int]]:
    """Prompts that repeat themselves (so prompt lookup finds matches) and random ones."""
    rng = random.Random(11)
    out = []
    for n in (5, 40, 130, 17, 64, 3, 90, 33):
        base = [rng.randrange(1000, 40000) for _ in range(max(2, n // 3))]
        out.append((base * 4)[:n] if n % 2 else [rng.randrange(1000, 40000) for _ in range(n)])
    return out


def _engine(model: Path, **kw) -> LLM:
    return LLM(str(model), dtype="float32", progress=False, **kw)


def _ids(llm: LLM, prompts, params) -> list[list[int]]:
    results = llm.generate(prompts, params)
    assert llm.engine.pool_is_whole()
    return [r.outputs[0].token_ids for r in results]


@pytest.fixture(scope="module")
def reference(tiny_llama, prompts) -> list[list[int]]:
    llm = _engine(tiny_llama, num_blocks=256)
    return [_ids(llm, [p], _greedy())[0] for p in prompts]


def _spec_totals(llm: LLM) -> tuple[int, int]:
    agg = llm.engine.spec.tracker.aggregate
    return agg.num_draft_tokens, agg.num_accepted_tokens


COPY_TEXTS = [
    "Repeat exactly: The quick brown fox jumps over the lazy dog near the river bank. "
    "Repeated: The quick brown fox",
    "def add(a, b):\n    return a + b\n\n\ndef sub(a, b):\n    return a - b\n\n# The same two functions again:\n",
    '{"name": "Alice", "age": 31, "city": "Paris"} {"name": "Bob", "age": 25, "city": "Berlin"} {"name": "Alice"',
    "1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12,",
    "Once upon a time",
    "Copy the list. apples, pears, plums, cherries, grapes, melons, lemons, limes, figs, dates, kiwis, "
    "mangoes, peaches, oranges, berries, quinces, apricots, olives, nuts, seeds, beans, peas, leeks, "
    "onions, carrots, beets, radishes, turnips, parsnips, potatoes, yams. Copy: apples, pears,",
]


@pytest.fixture(scope="module")
def smol_prompts(smollm2_gguf) -> list[list[int]]:
    llm = _smol(num_blocks=64)
    return [llm.engine.tokenizer.encode(t) for t in COPY_TEXTS]


@pytest.fixture(scope="module")
def smol_reference(smol_prompts) -> list[list[int]]:
    llm = _smol(num_blocks=128)
    return _ids(llm, smol_prompts, _greedy(32))


def _smol(**kw) -> LLM:
    from service.loader import default_model_path
    return LLM(str(default_model_path()), dtype="float32", progress=False, **kw)


@pytest.mark.parametrize("setting", ["alone", "batched", "chunked", "preempted"])
def test_ngram_greedy_equals_plain(smol_prompts, smol_reference, setting) -> None:
    kw = {"num_blocks": 128, "speculative_method": "ngram", "num_speculative_tokens": K,
          "spec_disable_window": 0}
    if setting == "chunked":
        kw["max_num_batched_tokens"] = 24
    if setting == "preempted":
        kw.update(num_blocks=14, max_num_batched_tokens=64)
    llm = _smol(**kw)
    if setting == "alone":
        got = [_ids(llm, [p], _greedy(32))[0] for p in smol_prompts]
    else:
        got = _ids(llm, smol_prompts, _greedy(32))
    assert got == smol_reference
    drafted, accepted = _spec_totals(llm)
    assert accepted > 0 and drafted > accepted     # drafts were accepted and rejected
    if setting == "preempted":
        assert llm.engine.scheduler.num_preemptions > 0


@pytest.mark.parametrize("method", ["ngram", "suffix"])
def test_bfloat16_speculation_equals_plain(smol_prompts, method) -> None:
    """bf16 on CPU: a request decoding alone keeps its verify steps (K + 1 rows) on the products of
    its plain decode steps (float32 on the GGUF's blocks), though on a CPU with AMX steps of that
    many rows from several sequences multiply on the tiles; each row's sums must not depend on how
    many rows share its step, or a verify step would pick other tokens than plain decoding."""
    from service.loader import default_model_path
    from service.models.layers.linear import AMX_MIN_ROWS

    assert K + 1 >= AMX_MIN_ROWS   # so a verify step's row count alone would take it to the tiles

    def run(llm: LLM) -> list:
        # The chosen tokens' logprobs too: equal bit for bit only if each verify row's logits are
        # the plain step's (greedy tokens alone would hide a difference in the last bits).
        outs = [llm.generate([p], _greedy(32, logprobs=0))[0].outputs[0] for p in smol_prompts]
        return [(o.token_ids, [lp.logprob for lp in o.logprobs]) for o in outs]

    reference = run(LLM(str(default_model_path()), dtype="bfloat16", progress=False, num_blocks=128))
    llm = LLM(str(default_model_path()), dtype="bfloat16", progress=False, num_blocks=128,
              speculative_method=method, num_speculative_tokens=K, spec_disable_window=0)
    assert run(llm) == reference
    drafted, accepted = _spec_totals(llm)
    assert accepted > 0 and drafted > accepted     # verify steps of several rows ran


def test_request_can_turn_speculation_off_and_on(smol_prompts, smol_reference) -> None:
    # Server default off: a request that asks still speculates (n-gram), one that says 0 does not.
    llm = _smol(num_blocks=64)
    off = llm.generate([smol_prompts[0]], _greedy(32))[0].outputs[0]
    assert off.spec is None and _spec_totals(llm) == (0, 0)
    on = llm.generate([smol_prompts[0]], _greedy(32, num_speculative_tokens=3))[0].outputs[0]
    assert on.token_ids == smol_reference[0] == off.token_ids
    assert on.spec["num_accepted_tokens"] > 0
    assert on.spec["mean_acceptance_length"] == pytest.approx(1 + on.spec["num_accepted_tokens"] / on.spec["num_drafts"])
    assert len(on.spec["drafted_per_position"]) <= 3
    zero = llm.generate([smol_prompts[0]], _greedy(32, num_speculative_tokens=0))[0].outputs[0]
    assert zero.spec is None and zero.token_ids == off.token_ids
    with pytest.raises(InvalidArgumentError, match="num_speculative_tokens"):
        llm.generate([smol_prompts[0]], _greedy(num_speculative_tokens=17))
    assert llm.engine.pool_is_whole()


def test_poor_acceptance_switches_speculation_off(tiny_llama, tiny_qwen2) -> None:
    # Another random model drafts for the target: it rarely agrees, and after a window of 2
    # drafts below the (demanding) acceptance bar the request decodes on its own.
    # (Adaptive k would stop drafting on its own at this acceptance: this tests the policy.)
    llm = _engine(tiny_llama, num_blocks=128, speculative_method="draft", draft_model=str(tiny_qwen2),
                  num_speculative_tokens=K, spec_disable_window=2, spec_min_acceptance=0.9, spec_adaptive_k=False)
    prompt = [random.Random(3).randrange(1000, 40000) for _ in range(20)]
    engine = llm.engine
    engine.add_request("r", prompt, _greedy(max_tokens=60))
    outs = []
    while engine.spec.tracker.enabled("r") and engine.has_unfinished():
        outs += engine.step()
    assert engine.spec.tracker.num_disabled == 1
    drafts_when_disabled = engine.spec.tracker.stats("r").num_drafts
    while engine.has_unfinished():
        outs += engine.step()
    final = outs[-1]
    assert final.finished and final.spec["num_drafts"] == drafts_when_disabled
    assert sum(len(o.token_ids) for o in outs) == 60
    assert engine.pool_is_whole()


# ---- draft model ------------------------------------------------------------------------------


@pytest.mark.parametrize("setting", ["batched", "preempted"])
def test_target_as_own_draft_accepts_nearly_all(tiny_llama, prompts, reference, setting) -> None:
    kw = {"num_blocks": 256} if setting == "batched" else {"num_blocks": 24, "max_num_batched_tokens": 64}
    llm = _engine(tiny_llama, speculative_method="draft", draft_model=str(tiny_llama),
                  num_speculative_tokens=K, spec_disable_window=0, **kw)
    assert _ids(llm, prompts, _greedy()) == reference
    drafted, accepted = _spec_totals(llm)
    assert drafted > 0 and accepted / drafted >= 0.98


def test_other_draft_model_keeps_greedy_output(tiny_llama, tiny_qwen2, prompts, reference) -> None:
    llm = _engine(tiny_llama, num_blocks=256, speculative_method="draft", draft_model=str(tiny_qwen2),
                  num_speculative_tokens=K, spec_disable_window=0, max_num_batched_tokens=48)
    assert _ids(llm, prompts, _greedy()) == reference
    assert _spec_totals(llm)[0] > 0


def test_seeded_sampling_with_draft_is_reproducible(tiny_llama, tiny_qwen2, prompts) -> None:
    llm = _engine(tiny_llama, num_blocks=256, speculative_method="draft", draft_model=str(tiny_llama),
                  num_speculative_tokens=K, spec_disable_window=0)
    params = SamplingParams(temperature=0.8, top_p=0.9, max_tokens=24, seed=99, ignore_eos=True)
    first = _ids(llm, prompts[:4], params)
    second = _ids(llm, prompts[:4], params)
    assert first == second
    drafted, accepted = _spec_totals(llm)
    # The target drafting for itself at the same temperature: p == q, so almost all accepted.
    assert drafted > 0 and accepted / drafted >= 0.9


def test_draft_tokenizer_mismatch_is_a_clear_error(tiny_llama, tmp_path) -> None:
    other = tmp_path / "other-vocab"
    shutil.copytree(tiny_llama, other)
    tok = json.loads((other / "tokenizer.json").read_text())
    vocab = tok["model"]["vocab"]
    a, b = (next(w for w, i in vocab.items() if i == n) for n in (1000, 1001))
    vocab[a], vocab[b] = 1001, 1000     # same tokens, two ids swapped: a different tokenizer
    (other / "tokenizer.json").write_text(json.dumps(tok))
    with pytest.raises(ModelLoadError, match="tokenizer differs"):
        _engine(tiny_llama, num_blocks=16, speculative_method="draft", draft_model=str(other))


# ---- guided, on the real model ----------------------------------------------------------------


PERSON = {
    "type": "object",
    "properties": {"name": {"type": "string"}, "age": {"type": "integer"}, "city": {"type": "string"}},
    "required": ["name", "age", "city"],
    "additionalProperties": False,
}


def test_guided_speculation_equals_plain_and_validates(smollm2_gguf) -> None:
    llm = _smol(num_blocks=128, speculative_method="ngram", num_speculative_tokens=K, spec_disable_window=0)
    tok = llm.engine.tokenizer
    text = ("Copy these records as JSON. name: Alice Smith, age: 31, city: Paris. "
            "name: Bob Jones, age: 25, city: Berlin. First record as JSON: ")
    ids = tok.encode(text)
    spec = GuidedSpec(kind="json_schema", value=json.dumps(PERSON))
    plain = llm.generate([ids, ids], [SamplingParams(temperature=0, max_tokens=60, guided=spec, num_speculative_tokens=0),
                                      SamplingParams(temperature=0, max_tokens=30, num_speculative_tokens=0)])
    fast = llm.generate([ids, ids], [SamplingParams(temperature=0, max_tokens=60, guided=spec),
                                     SamplingParams(temperature=0, max_tokens=30)])
    assert [r.outputs[0].token_ids for r in fast] == [r.outputs[0].token_ids for r in plain]
    out = fast[0].outputs[0]
    jsonschema.validate(json.loads(out.text), PERSON)
    assert out.spec["num_draft_tokens"] > 0 and out.spec["num_accepted_tokens"] > 0
    assert llm.engine.pool_is_whole()


def test_guided_draft_model_equals_plain_and_validates(smollm2_gguf) -> None:
    # The target as its own draft: the draft walks the grammar itself (its own masks per position).
    llm = _smol(num_blocks=128, speculative_method="draft", draft_model=str(smollm2_gguf),
                num_speculative_tokens=K, spec_disable_window=0)
    ids = llm.engine.tokenizer.encode("A person record as JSON: ")
    spec = GuidedSpec(kind="json_schema", value=json.dumps(PERSON))
    greedy = SamplingParams(temperature=0, max_tokens=60, guided=spec)
    plain = llm.generate([ids], SamplingParams(temperature=0, max_tokens=60, guided=spec, num_speculative_tokens=0))
    fast = llm.generate([ids], greedy)
    assert fast[0].outputs[0].token_ids == plain[0].outputs[0].token_ids
    jsonschema.validate(json.loads(fast[0].outputs[0].text), PERSON)
    sampled = llm.generate([ids] * 3, SamplingParams(temperature=0.9, max_tokens=80, guided=spec, seed=5))
    for r in sampled:
        jsonschema.validate(json.loads(r.outputs[0].text), PERSON)
    drafted, accepted = _spec_totals(llm)
    assert drafted > 0 and accepted / drafted >= 0.9
    assert llm.engine.pool_is_whole()


def test_prefix_cache_hit_with_speculation_keeps_output(smol_prompts, smol_reference) -> None:
    llm = _smol(num_blocks=128, speculative_method="ngram", num_speculative_tokens=K, spec_disable_window=0)
    first = llm.generate([smol_prompts[5]], _greedy(32))[0]
    again = llm.generate([smol_prompts[5]], _greedy(32))[0]
    assert first.num_cached_tokens == 0 and again.num_cached_tokens > 0
    assert again.outputs[0].token_ids == first.outputs[0].token_ids == smol_reference[5]
    assert llm.engine.pool_is_whole()


def test_draft_model_kv_uses_its_own_prefix_cache(tiny_llama, prompts, reference) -> None:
    # Fixed k: a draft model as large as the target never pays, and adaptive k, measuring that
    # from the start, would not draft at all.
    llm = _engine(tiny_llama, num_blocks=64, speculative_method="draft", draft_model=str(tiny_llama),
                  num_speculative_tokens=K, spec_disable_window=0, spec_adaptive_k=False)
    draft = llm.engine.spec.proposer
    long_prompt = prompts[2]                     # 130 tokens: 8 full blocks
    assert _ids(llm, [long_prompt], _greedy())[0] == reference[2]
    assert draft.kv.stats.hits == 0
    assert _ids(llm, [long_prompt], _greedy())[0] == reference[2]
    assert draft.kv.stats.hits >= 16 * 8        # the second request's draft reused the prompt's blocks
    hits = draft.kv.stats.hits
    llm.engine.add_request("salted", long_prompt, _greedy(), cache_salt="tenant-b")
    tokens = []
    while llm.engine.has_unfinished():
        tokens += [t for o in llm.engine.step() for t in o.token_ids]
    assert tokens == reference[2]
    assert draft.kv.stats.hits == hits           # another tenant's salt: no hit in the draft's cache either
    assert llm.engine.pool_is_whole()


def test_adaptive_k_step_costs_are_measured_before_the_first_request(tiny_llama, prompts, reference) -> None:
    """The start-up calibration times a lone sequence's steps of 1 .. k + 1 rows on borrowed KV
    blocks: every count is known before any request, the pool is whole again, nothing entered
    the prefix cache, and the first request decodes as without it."""
    llm = _engine(tiny_llama, num_blocks=64, speculative_method="ngram", num_speculative_tokens=K)
    table = llm.engine.spec.cost.table()
    assert sorted(table) == list(range(1, K + 2)) and all(t > 0 for t in table.values())
    assert llm.engine.pool_is_whole() and llm.engine.kv.stats.queries == 0
    assert _ids(llm, [prompts[1]], _greedy())[0] == reference[1]
    # The calibration's tokens (zeros) were never registered as cached blocks.
    assert llm.generate([[0] * 64], _greedy(4))[0].num_cached_tokens == 0
    assert llm.generate([[0] * 64], _greedy(4))[0].num_cached_tokens > 0   # control: such blocks do hit
    fixed = _engine(tiny_llama, num_blocks=64, speculative_method="ngram", num_speculative_tokens=K,
                    spec_adaptive_k=False)
    assert fixed.engine.spec.cost.table() == {}   # nothing adapts: nothing measured
