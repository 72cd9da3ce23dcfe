"""Guided decoding through the engine with the real SmolLM2: outputs validate / match / parse,
greedy and sampled, batched with unguided requests; jump-forward; EOS; n > 1; the async path."""
from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import jsonschema
import pytest

from decoding.guided import GuidedSpec
from decoding.sampling import SamplingParams
from service.engine.async_engine import AsyncEngine
from common.errors import InvalidArgumentError
from service.llm import LLM

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 24},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "city": {"enum": ["Paris", "London", "Tokyo"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 12}, "maxItems": 3},
    },
    "required": ["name", "age", "city", "tags"],
    "additionalProperties": False,
}
# Lark: arithmetic over small integers, checked below by a tiny recursive-descent parser.
ARITH = r"""
start: expr
expr: term (("+" | "-") term)*
term: factor (("*" | "/") factor)*
factor: NUMBER | "(" expr ")"
NUMBER: /[0-9]{1,3}/
"""
PHONE = r"\(\d{3}\) \d{3}-\d{4}"
MOODS = ["positive", "negative", "neutral"]


@pytest.fixture(scope="module")
def llm(smollm2_dir: Path) -> LLM:
    return LLM(str(smollm2_dir), progress=False)


def chat(llm: LLM, text: str) -> list[int]:
    tok = llm.tokenizer
    return tok.encode(tok.apply_chat_template([{"role": "user", "content": text}]), add_special_tokens=False)


def parses_arith(text: str) -> bool:
    tokens = re.findall(r"\d+|[-+*/()]", text)
    if "".join(tokens) != text:
        return False
    pos = 0

    def expr() -> bool:
        nonlocal pos
        if not term():
            return False
        while pos < len(tokens) and tokens[pos] in "+-":
            pos += 1
            if not term():
                return False
        return True

    def term() -> bool:
        nonlocal pos
        if not factor():
            return False
        while pos < len(tokens) and tokens[pos] in "*/":
            pos += 1
            if not factor():
                return False
        return True

    def factor() -> bool:
        nonlocal pos
        if pos < len(tokens) and tokens[pos].isdigit() and len(tokens[pos]) <= 3:
            pos += 1
            return True
        if pos < len(tokens) and tokens[pos] == "(":
            pos += 1
            if expr() and pos < len(tokens) and tokens[pos] == ")":
                pos += 1
                return True
        return False

    return expr() and pos == len(tokens)


def check(kind: str, text: str) -> None:
    if kind == "json":
        jsonschema.validate(json.loads(text), PERSON)
    elif kind == "regex":
        assert re.fullmatch(PHONE, text), text
    elif kind == "choice":
        assert text in MOODS, text
    elif kind == "grammar":
        assert parses_arith(text), text


SPECS = {
    "json": GuidedSpec("json_schema", PERSON),
    "regex": GuidedSpec("regex", PHONE),
    "choice": GuidedSpec("choice", MOODS),
    "grammar": GuidedSpec("grammar", ARITH),
}
PROMPTS = {
    "json": "Describe a traveller as JSON with name, age, city and tags.",
    "regex": "Give me a US phone number.",
    "choice": "Is the review 'I loved every minute' positive, negative or neutral?",
    "grammar": "Write an arithmetic expression that equals 42.",
}


def test_guided_batch_greedy_and_sampled_with_unguided(llm: LLM) -> None:
    """One batch: every kind, greedy and sampled, beside unguided requests. Every guided output
    satisfies its spec and ends with "stop" (terminated grammar) or "eos" (complete)."""
    prompts, params, kinds = [], [], []
    for kind, spec in SPECS.items():
        for temp, seed in ((0.0, None), (1.0, 11), (0.8, 12)):
            prompts.append(chat(llm, PROMPTS[kind]))
            params.append(SamplingParams(max_tokens=96, temperature=temp, seed=seed, guided=spec))
            kinds.append(kind)
    for seed in (1, 2):
        prompts.append(chat(llm, "Tell me a short story."))
        params.append(SamplingParams(max_tokens=24, temperature=0.7, seed=seed))
        kinds.append(None)
    results = llm.generate(prompts, params)
    for kind, res in zip(kinds, results):
        out = res.outputs[0]
        if kind is None:
            assert out.finish_reason in ("length", "eos") and out.text
            continue
        assert out.finish_reason in ("stop", "eos"), (kind, out.text, out.finish_reason)
        check(kind, out.text)


def test_outlines_core_backend_end_to_end(llm: LLM) -> None:
    schema = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 16},
                                               "city": {"enum": ["Paris", "London"]}},
              "required": ["name", "city"]}
    params = [SamplingParams(max_tokens=48, temperature=t, seed=3,
                             guided=GuidedSpec("json_schema", schema, backend="outlines-core")) for t in (0, 1.0)]
    params.append(SamplingParams(max_tokens=24, temperature=1.0, seed=4,
                                 guided=GuidedSpec("regex", PHONE, backend="outlines-core")))
    prompts = [chat(llm, "A person as JSON.")] * 2 + [chat(llm, PROMPTS["regex"])]
    res = llm.generate(prompts, params)
    for r in res[:2]:
        jsonschema.validate(json.loads(r.outputs[0].text), schema)
    assert re.fullmatch(PHONE, res[2].outputs[0].text)


def test_n_samples_each_get_their_own_guide(llm: LLM) -> None:
    res = llm.generate(chat(llm, PROMPTS["json"]), SamplingParams(
        n=3, max_tokens=96, temperature=1.0, seed=5, guided=SPECS["json"]))[0]
    texts = [o.text for o in res.outputs]
    for t in texts:
        check("json", t)
    assert len(set(texts)) > 1


LONG_KEYS = {"type": "object", "properties": {
    "the_quick_brown_fox_jumps_over_the_lazy_dog": {"type": "boolean"},
    "pack_my_box_with_five_dozen_liquor_jugs": {"type": "boolean"}},
    "required": ["the_quick_brown_fox_jumps_over_the_lazy_dog", "pack_my_box_with_five_dozen_liquor_jugs"],
    "additionalProperties": False}


def _generate_counting_steps(llm: LLM, params: SamplingParams):
    """One guided generation; returns (its output, the engine steps it took)."""
    steps = 0
    step = llm.engine.step

    def counting_step():
        nonlocal steps
        steps += 1
        return step()

    llm.engine.step = counting_step
    try:
        out = llm.generate(chat(llm, "JSON please."), params)[0].outputs[0]
    finally:
        del llm.engine.step
    return out, steps


def test_jump_forward_appends_forced_tokens_without_a_step_each(llm: LLM, smollm2_dir: Path) -> None:
    params = SamplingParams(max_tokens=64, temperature=0, guided=GuidedSpec("json_schema", LONG_KEYS))
    out, steps = _generate_counting_steps(llm, params)
    jsonschema.validate(json.loads(out.text), LONG_KEYS)
    assert out.finish_reason == "stop"
    # ~30 tokens of keys and punctuation are forced; only the two booleans are sampled
    assert len(out.token_ids) >= 20 and steps <= 8, (steps, len(out.token_ids))
    # --no-guided-jump-forward: the same output, one forward per token (the first from the prefill)
    plain = LLM(str(smollm2_dir), progress=False, guided_jump_forward=False)
    one_each, one_each_steps = _generate_counting_steps(plain, params)
    assert one_each.token_ids == out.token_ids
    assert one_each_steps >= len(out.token_ids), (one_each_steps, len(out.token_ids))


def test_eos_only_when_complete_and_length_truncation(llm: LLM) -> None:
    # \d+ is complete after one digit: it ends with EOS (the model's choice), never "stop"
    res = llm.generate([chat(llm, "Pick a number.")] * 3, [
        SamplingParams(max_tokens=8, temperature=0, guided=GuidedSpec("regex", r"\d+")),
        # (closing off: with it on, a max_tokens no complete output fits in is refused; see below)
        SamplingParams(max_tokens=4, temperature=0,
                       guided=dataclasses.replace(SPECS["json"], close_before_max_tokens=False)),
        SamplingParams(max_tokens=8, temperature=0, ignore_eos=True, guided=GuidedSpec("regex", r"\d{1,3}")),
    ])
    a, b, c = (r.outputs[0] for r in res)
    assert re.fullmatch(r"\d+", a.text) and a.finish_reason in ("eos", "length")
    if a.finish_reason == "eos":
        assert a.token_ids[-1] in llm.tokenizer.eos_token_ids
    assert b.finish_reason == "length" and len(b.token_ids) == 4      # truncated: not complete JSON
    assert re.fullmatch(r"\d{1,3}", c.text) and c.finish_reason == "stop"


def test_padding_ids_never_sampled(tiny_model_factory) -> None:
    """A model whose vocabulary is larger than the tokenizer's (padded embeddings): random
    weights put mass on the padding ids, the mask keeps them out."""
    path = tiny_model_factory("llama", vocab_size=49152 + 64)
    small = LLM(str(path), progress=False)
    res = small.generate([[1, 2, 3]] * 4, SamplingParams(
        max_tokens=24, temperature=1.5, seed=9, guided=GuidedSpec("regex", "[a-z]{3,20}")))
    for r in res:
        out = r.outputs[0]
        assert all(t < 49152 for t in out.token_ids)
        assert re.fullmatch("[a-z]{3,20}", out.text), out.text


async def test_async_engine_compiles_off_the_loop_and_reports_errors(llm: LLM) -> None:
    engine = AsyncEngine(llm.engine)
    try:
        with pytest.raises(InvalidArgumentError) as e:
            async for _ in engine.generate("hi", SamplingParams(
                    guided=GuidedSpec("json_schema", {"type": "array", "uniqueItems": True}))):
                pass
        assert e.value.field == "guided.json_schema" and "uniqueItems" in e.value.message

        async def run(spec, kind):
            text, reason = "", None
            async for out in engine.generate(chat(llm, PROMPTS[kind]), SamplingParams(
                    max_tokens=96, temperature=0.9, seed=21, guided=spec)):
                text += out.text
                reason = out.finish_reason or reason
            check(kind, text)
            return reason

        import asyncio

        reasons = await asyncio.gather(*(run(SPECS[k], k) for k in ("json", "choice", "regex")))
        assert all(r in ("stop", "eos") for r in reasons)
    finally:
        await engine.shutdown()


# An unbounded string and an unbounded array: the model could write until max_tokens.
LOOPY = {"type": "object", "properties": {
    "story": {"type": "string"},
    "tags": {"type": "array", "items": {"type": "string"}},
    "meta": {"type": "object", "properties": {"author": {"type": "string"}, "year": {"type": "integer"}},
             "required": ["author", "year"]}},
    "required": ["story", "tags", "meta"]}


def test_output_closes_before_max_tokens(llm: LLM) -> None:
    """A schema whose strings and arrays are unbounded, with a max_tokens far too small for the
    story the prompt asks for: the guide closes the output in time, greedy and sampled, n > 1
    too; every output parses and validates and ends with EOS or STOP, within max_tokens. With
    close_before_max_tokens=False the same request is cut mid-string (finish reason "length")."""
    prompt = chat(llm, "Write a very long story about a dragon, as JSON with story, tags and meta.")
    spec = GuidedSpec("json_schema", LOOPY)
    params = [SamplingParams(max_tokens=m, temperature=0, guided=spec) for m in (26, 40, 64)]
    params.append(SamplingParams(max_tokens=40, temperature=1.0, seed=7, n=3, guided=spec))
    params.append(SamplingParams(max_tokens=40, temperature=0, guided=GuidedSpec(
        "json_schema", LOOPY, close_before_max_tokens=False)))
    results = llm.generate([prompt] * len(params), params)
    for p, res in zip(params[:-1], results[:-1]):
        for out in res.outputs:
            assert out.finish_reason in ("eos", "stop"), (p.max_tokens, out.text)
            assert len(out.token_ids) <= p.max_tokens
            jsonschema.validate(json.loads(out.text), LOOPY)
    # Budget-closed, not naturally finished: the story is cut short (tokens near the budget).
    assert len(results[0].outputs[0].token_ids) >= 26 - 3
    off = results[-1].outputs[0]
    assert off.finish_reason == "length" and len(off.token_ids) == 40
    with pytest.raises(ValueError):
        json.loads(off.text)


def test_max_tokens_no_complete_output_fits_is_refused(llm: LLM) -> None:
    """Twelve required members: no complete output fits in 20 tokens. The request is refused
    up front (INVALID_ARGUMENT on max_tokens, naming the length the shortest output needs)
    instead of returning cut JSON; with that much room the same request validates; with
    close_before_max_tokens=False it runs and is cut; the engine serves on."""
    members = [f"a_rather_long_member_name_{i}" for i in range(12)]
    schema = {"type": "object", "properties": {m: {"type": "boolean"} for m in members},
              "required": members, "additionalProperties": False}
    prompt = chat(llm, "Fill in the form as JSON.")

    def params(max_tokens: int, close: bool = True) -> SamplingParams:
        return SamplingParams(max_tokens=max_tokens, temperature=0,
                              guided=GuidedSpec("json_schema", schema, close_before_max_tokens=close))

    with pytest.raises(InvalidArgumentError) as err:
        llm.generate([prompt], params(20))
    assert err.value.field == "max_tokens" and "20 is too small" in err.value.message
    need = int(re.search(r"output Weft finds is (\d+) tokens", err.value.message).group(1))
    assert 20 < need < 200
    fits, cut = llm.generate([prompt, prompt], [params(need), params(20, close=False)])
    out = fits.outputs[0]
    assert len(out.token_ids) <= need
    jsonschema.validate(json.loads(out.text), schema)
    assert cut.outputs[0].finish_reason == "length" and len(cut.outputs[0].token_ids) == 20


def test_closing_under_speculation_equals_plain(smollm2_dir: Path) -> None:
    """n-gram speculation drafts through the budget zone (the looping description makes drafts
    that get accepted): each draft position is masked with the budget guide at that position
    and rejected drafts are rolled back, so greedy output is identical to no speculation, and
    it closes in time."""
    llm = LLM(str(smollm2_dir), progress=False, num_blocks=128, speculative_method="ngram",
              num_speculative_tokens=4, spec_disable_window=0)
    prompt = chat(llm, "Write a very long story about a dragon, as JSON with story, tags and meta.")
    spec = GuidedSpec("json_schema", LOOPY)
    for max_tokens in (40, 96):
        plain = llm.generate([prompt], SamplingParams(max_tokens=max_tokens, temperature=0, guided=spec,
                                                      num_speculative_tokens=0))[0].outputs[0]
        fast = llm.generate([prompt], SamplingParams(max_tokens=max_tokens, temperature=0, guided=spec))[0].outputs[0]
        assert fast.token_ids == plain.token_ids, max_tokens
        assert fast.finish_reason in ("eos", "stop")
        jsonschema.validate(json.loads(fast.text), LOOPY)
        assert fast.spec["num_accepted_tokens"] > 0
    assert llm.engine.pool_is_whole()
