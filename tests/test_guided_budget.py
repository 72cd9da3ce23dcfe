"""Budget-aware guides (decoding/guided/budget.py) below the engine: the mask is the grammar's
until the closing plan's slack runs low, then it narrows (softly: closers; hard: the plan's next
token); forced and rolled-back tokens count; the plan completes cut-off valid instances of the
dev subset into outputs that validate; the off switch."""
from __future__ import annotations

import json

import jsonschema
import pytest
import torch

from decoding.guided import GuideCompiler, GuidedSpec
from decoding.guided import budget as B
from decoding.sampling import SamplingParams
from tests.test_guided import BACKENDS, OUTLINES_SUBSET, VOCAB, _dev, enc, tok  # noqa: F401  (tok: fixture)

STRING_OBJ = {"type": "object", "properties": {"s": {"type": "string"}}, "required": ["s"],
              "additionalProperties": False}


@pytest.fixture(scope="module")
def compiler(tok) -> GuideCompiler:
    c = GuideCompiler(tok, VOCAB)
    yield c
    c.shutdown()


def mask(guide, words: int) -> torch.Tensor:
    row = torch.zeros(words, dtype=torch.int32)
    guide.fill_bitmask(row)
    return row


def allowed_ids(row: torch.Tensor) -> set[int]:
    words = row.numpy().view("uint32")
    return {32 * w + j for w in range(words.shape[0]) if words[w] for j in range(32) if (int(words[w]) >> j) & 1}


@pytest.mark.parametrize("backend", BACKENDS)
def test_narrowing_only_within_the_reserve_and_rollback(compiler, tok, backend) -> None:
    """An unbounded string: the budget guide's mask equals the plain guide's until the plan's
    slack is SOFT_SLACK (then: only closers), and at HARD_SLACK only the plan's next token;
    rolling back out of the reserve restores the plain mask, and going forward again narrows
    at the same counts."""
    g = compiler.compile_sync(GuidedSpec("json_schema", STRING_OBJ, backend=backend))
    words = compiler.bitmask_words
    max_tokens = 24
    guide = g.new_guide(max_tokens=max_tokens)
    plain = g.new_guide()
    assert isinstance(guide, B.BudgetGuide) and not isinstance(plain, B.BudgetGuide)
    prefix = enc(tok, '{"s":"')
    a = enc(tok, "a")[0]
    quote = enc(tok, '"')[0]
    ids = prefix + [a] * (max_tokens - len(prefix))
    narrowed_at = {}
    for i, t in enumerate(ids):
        got, want = mask(guide, words), mask(plain, words)
        slack = guide.slack()
        if slack is None or slack > B.SOFT_SLACK:
            assert torch.equal(got, want), i
        else:
            ids_got, ids_want = allowed_ids(got), allowed_ids(want)
            assert ids_got < ids_want and a not in ids_got, i       # narrowed, never widened
            narrowed_at[i] = ids_got
            if slack <= B.HARD_SLACK:
                assert len(ids_got) == 1, (i, ids_got)
            else:
                assert quote in ids_got, i
                for t2 in ids_got:   # every allowed token ends the string (`"`, `"}`, `end."` ...)
                    text = tok.decode([t2])
                    assert text.rstrip("}").endswith('"') and text.count('"') == 1, text
        if i >= len(prefix) and slack is not None and slack <= B.SOFT_SLACK:
            break
        assert guide.advance(t) and plain.advance(t)
    first = min(narrowed_at)
    assert first > len(prefix) and guide.count == first
    # The plan from inside the string: close it (and the object), then EOS or termination.
    assert len(guide.plan()) <= 3
    # Roll back out of the reserve: the plain mask again, and the count follows.
    guide.rollback(4)
    plain.rollback(4)
    assert guide.count == first - 4
    assert torch.equal(mask(guide, words), mask(plain, words))
    # Forward again (as after rejected speculative drafts): narrowing comes back at the same count.
    for t in ids[first - 4:first]:
        assert torch.equal(mask(guide, words), mask(plain, words))
        assert guide.advance(t) and plain.advance(t)
    assert allowed_ids(mask(guide, words)) == narrowed_at[first]
    # Following the narrowed masks completes the output within max_tokens.
    while not guide.is_complete():
        choice = sorted(allowed_ids(mask(guide, words)))
        assert choice and guide.advance(choice[0])
    assert guide.count <= max_tokens
    text = tok.decode(ids[:first] + guide._tokens[first:])
    jsonschema.validate(json.loads(text), STRING_OBJ)


def test_forced_tokens_count_toward_the_budget(compiler, tok) -> None:
    schema = {"type": "object", "properties": {"a_rather_long_property_name": {"type": "string"}},
              "required": ["a_rather_long_property_name"], "additionalProperties": False}
    guide = compiler.compile_sync(GuidedSpec("json_schema", schema)).new_guide(max_tokens=30)
    forced = guide.forced_tokens()
    assert len(forced) >= 3
    for t in forced:
        assert guide.advance(t)
    assert guide.count == len(forced) and guide.remaining == 30 - len(forced)


def test_regex_hard_deadline(compiler, tok) -> None:
    """Non-JSON kinds: no soft narrowing, but the plan's deadline still holds."""
    g = compiler.compile_sync(GuidedSpec("regex", r"a[b-y]*z"))
    words = compiler.bitmask_words
    guide = g.new_guide(max_tokens=8)
    b, z = enc(tok, "b")[0], enc(tok, "z")[0]
    assert guide.advance(enc(tok, "a")[0])
    steps = 0
    while not guide.is_complete():
        ids = allowed_ids(mask(guide, words))
        t = b if b in ids else sorted(ids)[0]
        assert guide.advance(t)
        steps += 1
        assert steps < 8
    assert guide._tokens[-1] == z and guide.count <= 7          # room left for EOS


def test_off_switch(compiler) -> None:
    g = compiler.compile_sync(GuidedSpec("json_schema", STRING_OBJ))
    on = SamplingParams(max_tokens=10, guided=GuidedSpec("json_schema", STRING_OBJ))
    off = SamplingParams(max_tokens=10, guided=GuidedSpec("json_schema", STRING_OBJ, close_before_max_tokens=False))
    assert isinstance(g.new_guide(on), B.BudgetGuide) and g.new_guide(on).max_tokens == 10
    assert not isinstance(g.new_guide(off), B.BudgetGuide)
    # The option does not change the compiled grammar: one cache entry serves both.
    assert off.guided.cache_key() == on.guided.cache_key()
    with pytest.raises(Exception) as e:
        GuidedSpec("regex", "a", close_before_max_tokens="no").validate()
    assert "close_before_max_tokens" in str(e.value)


def _validator(schema):
    cls = jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator)
    return cls(schema, format_checker=cls.FORMAT_CHECKER)


@pytest.mark.parametrize("backend", BACKENDS)
def test_plan_completes_cut_instances_of_the_dev_subset(compiler, tok, backend) -> None:
    """Every valid instance of the dev subset, cut after 1/3 and 2/3 of its tokens: the closing
    plan completes it into JSON that validates (formats checked), and in few tokens."""
    checked, lengths = 0, []
    docs = _dev() if backend == "llguidance" else _dev(OUTLINES_SUBSET)
    for name, doc in docs:
        try:
            g = compiler.compile_sync(GuidedSpec("json_schema", doc["schema"], backend=backend))
        except Exception:
            continue
        validator = _validator(doc["schema"])
        for test in doc["tests"]:
            if not test["valid"]:
                continue
            ids = enc(tok, json.dumps(test["data"], separators=(",", ":"), ensure_ascii=False))
            for cut in (len(ids) // 3, 2 * len(ids) // 3):
                guide = g.new_guide(max_tokens=len(ids) + 400)
                if not all(guide.advance(t) for t in ids[:cut]):
                    break   # a prefix the backend's index does not accept (outlines-core's known gaps)
                plan = guide.plan()
                assert plan is not None, (name, cut)
                body = [t for t in plan if t != B.EOS]
                text = tok.decode(ids[:cut] + body)
                errors = list(validator.iter_errors(json.loads(text)))
                assert not errors, (name, text, errors[0].message)
                checked += 1
                lengths.append(len(plan))
    assert checked >= (20 if backend == "llguidance" else 4), checked
    print(f"\n{backend}: {checked} completions, plan length max {max(lengths)}, "
          f"mean {sum(lengths) / len(lengths):.1f}")


def test_plan_finds_unanchored_patterns_and_formats(compiler, tok) -> None:
    """Strings the preferred characters alone do not finish: an unanchored pattern that needs
    "digits,digits" somewhere (found by the short search), a long minLength, formats."""
    props = {"loc": {"type": "string", "pattern": "-?[0-9]+(?:\\.[0-9]+)?,-?[0-9]+"},
             "long": {"type": "string", "minLength": 30},
             "mail": {"type": "string", "format": "email"},
             "when": {"type": "string", "format": "date-time"},
             "day": {"type": "string", "format": "date"},   # year 0000 is not a date for jsonschema
             "code": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{2}$"},
             # unanchored alternation / long literal prefix: only the patterns' own shortest
             # matches (hints.py) make these closable
             "level": {"type": "string", "pattern": "srn:ref/Class:RESTRICTED|CLASSIFIED|CONFIDENTIAL:[0-9]*"},
             "file": {"type": "string", "pattern": "srn:type:file/[A-Za-z0-9-]+:[0-9]*"}}
    for key, sub in props.items():
        schema = {"type": "object", "properties": {key: sub}, "required": [key]}
        guide = compiler.compile_sync(GuidedSpec("json_schema", schema)).new_guide(max_tokens=200)
        prefix = enc(tok, '{"%s":"New York, USA' % key) if key in ("loc", "level", "file") else enc(tok, '{"%s":"' % key)
        assert all(guide.advance(t) for t in prefix)
        plan = guide.plan()
        assert plan is not None and len(plan) <= 40, key
        text = tok.decode(prefix + [t for t in plan if t != B.EOS])
        assert not list(_validator(schema).iter_errors(json.loads(text))), text


def test_soft_narrowing_in_a_key_follows_the_plan(compiler, tok) -> None:
    """Near the end, inside an object key, the model may not start an optional member (whose
    value could need many more tokens): the mask is the plan's next token (a required one)."""
    schema = {"type": "object", "properties": {
        "rank": {"type": "integer"},
        "report": {"type": "object", "properties": {f"f{i}": {"type": "boolean"} for i in range(20)},
                   "required": [f"f{i}" for i in range(20)]},
        "reason": {"type": "string"}},
        "required": ["rank", "reason"], "additionalProperties": False}
    g = compiler.compile_sync(GuidedSpec("json_schema", schema))
    words = compiler.bitmask_words
    prefix = enc(tok, '{"rank":1,"re')
    for max_tokens in (len(prefix) + 60, len(prefix) + 6):
        guide = g.new_guide(max_tokens=max_tokens)
        assert all(guide.advance(t) for t in prefix)
        plan = guide.plan()
        assert guide._in_key(plan, guide._modes[-1])
        ids = allowed_ids(mask(guide, words))
        if max_tokens > len(prefix) + 50:                      # far from the end: both keys open
            assert len(ids) > 1
        else:
            assert ids == {plan[0]}, [tok.decode([t]) for t in ids]
            assert tok.decode([plan[0]]) in ("ason", "a", "as", "aso")   # toward "reason"


def test_hints_are_shortest_matches_of_the_schema_patterns(compiler, tok) -> None:
    """Each pattern's shortest match (and each top-level alternative's) that re.search accepts,
    JSON-escaped and spelled in token ids; patterns Python cannot parse give none."""
    from decoding.guided.hints import schema_patterns, shortest_matches, string_hints

    assert shortest_matches("RESTRICTED|CLASSIFIED|MOST-CONFIDENTIAL:[0-9]*") == [
        "RESTRICTED", "CLASSIFIED", "MOST-CONFIDENTIAL:"]
    assert shortest_matches("^[^@]+@[a-z]+\\.[a-z]{2,}$") == ["a@a.aa"]
    assert shortest_matches("^(\\d{3})-\\1$") == []            # a back-reference: no hint
    assert shortest_matches("[") == []
    schema = {"properties": {"pattern": {"type": "string", "pattern": "x+y"},
                             "q": {"type": "string", "pattern": 'a"b'}},
              "patternProperties": {"^k[0-9]$": {}}}
    assert sorted(schema_patterns(schema)) == ['^k[0-9]$', 'a"b', "x+y"]
    g = compiler.compile_sync(GuidedSpec("json_schema", schema))
    texts = [tok.decode(list(h)) for h in g.string_hints]
    assert sorted(texts[:2]) == ["k0", "xy"] and texts[2] == 'a\\"b'   # shortest first; the quote escaped


# ---- the closing guarantee, whatever the model does ----------------------------------------------

_WIDE = {"type": "object", "properties": {f"p{i}": {"type": "string"} for i in range(25)},
         "required": [f"p{i}" for i in range(25)]}
GUARANTEE_SCHEMAS = [
    # `[{` into an array of wide objects: one token that needs ~100 more.
    {"type": "object", "properties": {"rows": {"type": "array", "items": _WIDE}, "name": {"type": "string"}},
     "required": ["rows", "name"]},
    # strings and arrays of strings a model loops in, under an optional nested object
    {"type": "object", "properties": {"a": {"type": "string"}, "b": {"type": "array", "items": {"type": "string"}},
                                      "c": {"type": "object", "properties": {"d": {"type": "integer"}}}},
     "required": ["a", "b"]},
    # alternatives of different sizes
    {"anyOf": [{"type": "array", "items": {"type": "number"}, "minItems": 3}, _WIDE]},
    # a wide object entered by jump-forward tokens (no choice, so nothing to verify) while the
    # model writes its first strings at length
    {"type": "object", "properties": {"id": {"type": "integer"}, "props": _WIDE}, "required": ["id", "props"],
     "additionalProperties": False},
]


def _random_run(guide, words: int, eos: int, policy: str, rng, opening: set[int], stalling: set[int]) -> list[int]:
    """Tokens a 'model' picks from the mask until EOS is the only choice or the grammar ends:
    uniformly, preferring tokens that open structure, repeating itself, or stalling (string
    content whenever it may: the longest strings). Never EOS by choice."""
    out: list[int] = []
    while not guide.is_terminated() and len(out) < guide.max_tokens:
        forced = guide.forced_tokens()
        if forced:
            for t in forced[:guide.max_tokens - len(out)]:
                assert guide.advance(t)
                out.append(t)
            continue
        ids = sorted(allowed_ids(mask(guide, words)) - {eos})
        if not ids:
            break
        if policy == "open" and rng.random() < 0.7 and opening & set(ids):
            t = rng.choice(sorted(opening & set(ids)))
        elif policy == "repeat" and out and out[-1] in ids and rng.random() < 0.9:
            t = out[-1]
        elif policy == "stall" and (content := [i for i in ids if i in stalling]):
            t = rng.choice(content)
        else:
            t = rng.choice(ids)
        assert guide.advance(t)
        out.append(t)
    return out


@pytest.mark.parametrize("schema", GUARANTEE_SCHEMAS)
def test_any_token_choice_closes_before_max_tokens(compiler, tok, schema) -> None:
    """A 'model' that never picks EOS and takes any token the mask allows (preferring `{`, `[`,
    `,`; looping on one token; or writing string content whenever it may) still ends with a
    complete, valid document within max_tokens."""
    import random

    g = compiler.compile_sync(GuidedSpec("json_schema", schema))
    words = compiler.bitmask_words
    eos = tok.eos_token_ids[0]
    tb = g.budget_tables.token_bytes
    opening = {i for i, b in enumerate(tb) if b and any(c in b for c in b"{[,")}
    stalling = {i for i, b in enumerate(tb) if b and b.isalnum()}      # letters and digits only
    # 30 tokens more than the shortest output the planner finds (and at least 140)
    max_tokens = max(140, len(g.new_guide(max_tokens=1024).plan()) + 30)
    for policy in ("uniform", "open", "repeat", "stall"):
        for seed in range(1):
            guide = g.new_guide(max_tokens=max_tokens)
            out = _random_run(guide, words, eos, policy, random.Random(seed), opening, stalling)
            assert guide.is_complete() and len(out) < max_tokens, (policy, seed, tok.decode(out)[-120:])
            jsonschema.validate(json.loads(tok.decode(out)), schema)


def _draft_walk(guide, words: int, draft: list[int]) -> list[torch.Tensor]:
    """What the engine's speculation does with a draft (constrain_to_guide): the mask before each
    draft token, the token advanced while allowed, the mask after the last one, then a rollback."""
    masks, advanced = [], 0
    for t in draft:
        masks.append(mask(guide, words))
        if t not in allowed_ids(masks[-1]) or not guide.advance(t):
            break
        advanced += 1
    else:
        masks.append(mask(guide, words))
    guide.rollback(advanced)
    return masks


@pytest.mark.parametrize("schema", GUARANTEE_SCHEMAS[:2] + GUARANTEE_SCHEMAS[3:])
def test_masks_under_speculation_equal_plain(compiler, tok, schema) -> None:
    """The mask at a position is a function of the tokens before it: a run that drafts ahead
    (the plain run's next tokens, then a wrong one and a random tail), is rolled back and
    commits the accepted tokens without masking them again, as the engine does, sees at every
    position the mask the plain run saw. Random 'models' drive the plain run into the soft and
    hard zones, where the planner's schedule, cached plans and verdicts change each step."""
    import random

    g = compiler.compile_sync(GuidedSpec("json_schema", schema))
    words = compiler.bitmask_words
    eos = tok.eos_token_ids[0]
    tb = g.budget_tables.token_bytes
    opening = {i for i, b in enumerate(tb) if b and any(c in b for c in b"{[,")}
    stalling = {i for i, b in enumerate(tb) if b and b.isalnum()}
    max_tokens = max(140, len(g.new_guide(max_tokens=1024).plan()) + 30)
    for policy in ("open", "stall"):
        rng = random.Random(7)
        plain = _Recorder(g.new_guide(max_tokens=max_tokens))
        out = _random_run(plain, words, eos, policy, rng, opening, stalling)
        guide = g.new_guide(max_tokens=max_tokens)
        pos, checked = 0, 0
        while pos < len(out):
            if guide.forced_tokens():       # jump-forward, as after the plain run's token
                t = out[pos]
                assert guide.advance(t)
                pos += 1
                continue
            k = rng.randint(1, 5)
            wrong = rng.randint(0, k)       # drafts[:wrong] are the plain run's, the rest are not
            draft = out[pos:pos + wrong]
            masks = _draft_walk(guide, words, draft + _random_tail(guide, words, draft, k - len(draft), rng, eos))
            for j, m in enumerate(masks[:len(draft) + 1]):
                if pos + j in plain.masks:
                    assert torch.equal(m, plain.masks[pos + j]), (policy, pos + j)
                    checked += 1
            # The engine commits the accepted drafts and the target's token after them.
            for t in out[pos:pos + len(draft) + 1]:
                assert guide.advance(t)
            pos += len(draft) + 1
        assert checked > len(plain.masks) // 2 and guide.narrowed == plain.guide.narrowed, policy
        assert plain.guide.narrowed > 0, policy      # the runs reached the planner's zones


def _random_tail(guide, words: int, head: list[int], n: int, rng, eos: int) -> list[int]:
    """n random draft tokens after `head` (a drafter running ahead: it masks and advances the
    guide, then rolls it back)."""
    for t in head:
        assert guide.advance(t)
    tail = []
    for _ in range(n):
        if guide.is_terminated():
            break
        ids = sorted(allowed_ids(mask(guide, words)) - {eos})
        if not ids:
            break
        tail.append(rng.choice(ids))
        assert guide.advance(tail[-1])
    guide.rollback(len(head) + len(tail))
    return tail


class _Recorder:
    """A guide that keeps the mask it gave at each position (forced positions get none)."""

    def __init__(self, guide) -> None:
        self.guide, self.masks = guide, {}

    def __getattr__(self, name):
        return getattr(self.guide, name)

    def fill_bitmask(self, row: torch.Tensor) -> None:
        self.guide.fill_bitmask(row)
        self.masks[self.guide.count] = row.clone()
