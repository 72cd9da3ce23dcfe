"""The schema normaliser (decoding/guided/normalize/): every rewrite is exact.

The oracle is `jsonschema`: on the official JSON-Schema-Test-Suite (Draft 2020-12) each schema
and its rewrite agree on every instance, and the rewritten schemas that compile accept exactly
the valid instances token by token. Each rewrite family also has its own checks over a pool of
JSON values of every type.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bench.conformance import accepts
from common.errors import InvalidArgumentError
from decoding.guided import GuideCompiler, GuidedSpec
from decoding.guided.normalize import Document, negate, normalize_schema
from decoding.guided.normalize.disjoint import disjoint
from decoding.guided.normalize.strings import not_matching, other_than
from service.tokenizer import Tokenizer

SUITE = Path(__file__).resolve().parents[2] / "shared/data/json-schema-test-suite/draft2020-12"
VOCAB = 49152
D2020 = "https://json-schema.org/draft/2020-12/schema"
D7 = "http://json-schema.org/draft-07/schema#"
D4 = "http://json-schema.org/draft-04/schema#"

# Values of every type, with the edges the rewrites care about (integral floats, empty
# containers, strings around the literals and classes used below).
POOL: list[Any] = [
    None, True, False, 0, 1, -1, 2, 3, 1.0, 2.5, -0.5, 10, 1e3, "", "a", "ab", "abc", "b", "x y", "-",
    "{}", "A1", "a\n", [], [1], [1, 2], ["a", 1], [[1]], [1, 2, 3], {}, {"a": 1}, {"b": 2}, {"a": 1, "b": 2},
    {"a": "x"}, {"a": None}, {"c": []}, {"a": 1, "c": 3}, {"kind": "cat"}, {"kind": "dog", "a": 1},
]


def valid(schema: Any, value: Any, draft: str = D2020) -> bool:
    cls = jsonschema.validators.validator_for({"$schema": draft}, default=jsonschema.Draft202012Validator)
    root = {"$schema": draft, **schema} if isinstance(schema, dict) else schema
    return cls(root).is_valid(value)


def doc(draft: str = D2020, **extra: Any) -> Document:
    return Document({"$schema": draft, **extra})


# ---- the official test suite -----------------------------------------------------------------

# keyword file -> groups whose schema the normaliser must rewrite (the rest it may leave alone)
REWRITTEN_AT_LEAST = {"not": 4, "oneOf": 6, "dependentRequired": 4, "dependentSchemas": 3, "if-then-else": 11,
                      "allOf": 0, "anyOf": 0, "enum": 0, "const": 0, "type": 0, "format": 0, "required": 0,
                      "properties": 0, "ref": 0, "items": 0, "prefixItems": 0, "boolean_schema": 0,
                      "unevaluatedProperties": 0, "unevaluatedItems": 0, "additionalProperties": 0,
                      "minimum": 0, "exclusiveMinimum": 0, "pattern": 0}


def _suite(name: str) -> list[dict]:
    path = SUITE / f"{name}.json"
    if not path.exists():
        pytest.skip(f"no test suite at {SUITE}")
    return json.loads(path.read_text())


@pytest.mark.parametrize("keyword", sorted(REWRITTEN_AT_LEAST))
def test_rewrites_agree_with_jsonschema_on_the_test_suite(keyword: str) -> None:
    rewritten = 0
    for group in _suite(keyword):
        schema = group["schema"]
        out = normalize_schema(schema)
        rewritten += out is not schema
        for test in group["tests"]:
            try:
                before = jsonschema.Draft202012Validator(schema).is_valid(test["data"])
            except (jsonschema.exceptions.SchemaError, re.error, LookupError):
                continue        # remote refs, \p{..} classes Python lacks: no oracle to compare with
            assert jsonschema.Draft202012Validator(out).is_valid(test["data"]) == before == test["valid"], (
                group["description"], test["description"], out)
    assert rewritten >= REWRITTEN_AT_LEAST[keyword]


@pytest.fixture(scope="module")
def compiler(smollm2_dir: Path) -> GuideCompiler:
    c = GuideCompiler(Tokenizer.from_dir(smollm2_dir), VOCAB)
    yield c
    c.shutdown()


@pytest.mark.parametrize("keyword", ["not", "oneOf", "dependentRequired", "dependentSchemas", "if-then-else"])
def test_rewritten_suite_schemas_accept_exactly_the_valid_instances(compiler: GuideCompiler, keyword: str) -> None:
    tok = compiler.tokenizer
    compiled = 0
    for group in _suite(keyword):
        schema = group["schema"]
        if normalize_schema(schema) is schema:
            continue
        try:
            grammar = compiler.compile_sync(GuidedSpec("json_schema", schema))
        except InvalidArgumentError:
            continue        # still refused (an unsatisfiable schema, say): never wrong
        compiled += 1
        for test in group["tests"]:
            ok, _ = accepts(grammar, test["data"], lambda s: tok.encode(s, add_special_tokens=False), tok.decode,
                            compiler.bitmask_words, schema=schema)
            assert ok == test["valid"], (group["description"], test["description"])
    # dependentSchemas: 3 of its 4, the fourth ({"minProperties": 4} over free keys) is refused
    # (decoding/guided/duplicate_keys.py).
    assert compiled >= min(4, REWRITTEN_AT_LEAST[keyword])


# ---- strings ---------------------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(st.lists(st.text("ab\u00e9\U0001f600.", max_size=4), max_size=5), st.lists(st.text("ab\u00e9.", max_size=5),
                                                                                   max_size=20))
def test_other_than_matches_exactly_the_other_strings(members: list[str], probes: list[str]) -> None:
    rx = other_than(members)
    assert rx is not None
    for s in probes + members:
        assert bool(re.search(rx, s)) == (s not in members), (members, s, rx)


def test_other_than_refuses_a_member_ending_in_a_newline() -> None:
    # Python's `$` also matches before a final newline: the regex could not be exact there.
    assert other_than(["a\n"]) is None


@pytest.mark.parametrize("pattern, inside, outside", [
    # Python's `$` (the oracle's) also matches before a final newline: "a\n" matches `^[a-z]+$`.
    (r"^[a-z]+$", ["a", "abc", "a\n"], ["", "\n", "aB", "1", "a\nb", "a\n\n"]),
    (r"^[\w.-]*$", ["", "ab", "a.b\n"], ["a b", " ", "\n\n"]),
    (r"^\d+$", ["1", "123"], ["", "1a"]),
    (r"^[\s\d]+$", ["1", " \n"], ["", "1a"]),
    (r"^(cat|dog)$", ["cat", "dog", "cat\n"], ["", "ca", "cats", "bird", "cat\n\n"]),
])
def test_not_matching_is_the_complement_of_a_pattern(pattern: str, inside: list[str], outside: list[str]) -> None:
    neg = not_matching(pattern)
    for s in inside:
        assert re.search(pattern, s) and not valid(neg, s)
    for s in outside:
        assert not re.search(pattern, s) and valid(neg, s)


# ---- not -------------------------------------------------------------------------------------

NEGATABLE = [
    ({"type": "string"}, D2020), ({"type": ["null", "object"]}, D2020), ({"type": "number"}, D2020),
    ({"const": 1}, D2020), ({"enum": ["ab", "b", None, True, 2.5]}, D2020), ({"const": "a", "type": "string"}, D2020),
    ({"required": ["a", "b"]}, D2020), ({"properties": {"a": {"type": "number", "minimum": 1}}}, D2020),
    ({"minLength": 2, "maxLength": 3}, D2020), ({"minItems": 1, "maxItems": 2}, D2020),
    ({"minProperties": 1, "maxProperties": 1}, D2020), ({"minimum": 1, "exclusiveMaximum": 3}, D2020),
    ({"minimum": 1, "maximum": 3, "exclusiveMaximum": True}, D4), ({"minimum": 1, "exclusiveMinimum": True}, D4),
    ({"pattern": "^[a-z]+$"}, D2020), ({"allOf": [{"type": "string"}, {"minLength": 2}]}, D2020),
    ({"anyOf": [{"type": "string"}, {"type": "array", "minItems": 2}]}, D2020),
    ({"oneOf": [{"minLength": 2}, {"maxLength": 2}]}, D2020), ({"not": {"type": "array"}}, D2020),
    ({"if": {"type": "string"}, "then": {"minLength": 2}, "else": {"type": "null"}}, D2020),
    ({"dependentRequired": {"a": ["b"]}}, D2020), ({"dependentSchemas": {"a": {"required": ["c"]}}}, D2020),
    ({"prefixItems": [{"type": "null"}, {"type": "string"}], "items": False}, D2020),
    ({"items": [{"type": "number"}], "additionalItems": False}, D7),
    ({"format": "color", "type": "string"}, D2020), ({}, D2020),
]


@pytest.mark.parametrize("schema, draft", NEGATABLE)
def test_negate_is_the_complement(schema: dict, draft: str) -> None:
    neg = negate(schema, doc(draft))
    assert neg is not None
    for v in POOL:
        assert valid(neg, v, draft) != valid(schema, v, draft), (schema, neg, v)


@pytest.mark.parametrize("schema", [
    {"type": "integer"},                               # the non-integer numbers have no name
    {"multipleOf": 3}, {"uniqueItems": True}, {"contains": {"type": "string"}},
    {"items": {"type": "string"}}, {"additionalProperties": False}, {"patternProperties": {"a": {"type": "string"}}},
    {"format": "date"}, {"enum": [[1]]}, {"pattern": "a.b"},
])
def test_negate_refuses_what_has_no_exact_complement(schema: dict) -> None:
    assert negate(schema, doc()) is None


# ---- oneOf -----------------------------------------------------------------------------------


@pytest.mark.parametrize("a, b", [
    ({"type": "string"}, {"type": "null"}),
    ({"properties": {"kind": {"const": "cat"}}, "required": ["kind"], "type": "object"},
     {"properties": {"kind": {"const": "dog"}}, "required": ["kind"], "type": "object"}),
    ({"type": "object", "required": ["a"]}, {"type": "object", "properties": {"b": {}}, "additionalProperties": False}),
    ({"type": "object", "required": ["a"], "properties": {"a": {"type": "integer"}}},
     {"type": "object", "additionalProperties": {"type": "string"}}),
    ({"enum": [1, "b"]}, {"type": "string", "minLength": 2}),
    ({"$ref": "#/$defs/s"}, {"type": "null"}),
])
def test_disjoint_proofs_hold_on_every_value(a: dict, b: dict) -> None:
    d = doc(**{"$defs": {"s": {"type": "string"}}})
    assert disjoint(a, b, d) and disjoint(b, a, d)
    root = {"$defs": {"s": {"type": "string"}}}
    assert not any(valid({**root, **a}, v) and valid({**root, **b}, v) for v in POOL)


@pytest.mark.parametrize("a, b", [
    ({"type": "string"}, {"minLength": 2}),
    ({"type": "object", "required": ["a"]}, {"type": "object", "required": ["b"]}),
    ({"required": ["a"], "additionalProperties": False}, {"required": ["b"]}),
])
def test_disjoint_claims_nothing_without_a_proof(a: dict, b: dict) -> None:
    assert not disjoint(a, b, doc())


@pytest.mark.parametrize("schema", [
    {"oneOf": [{"type": "string"}, {"type": "null"}, {"type": "integer"}]},
    {"oneOf": [{"minLength": 2}, {"maxLength": 3}]},                         # by complements
    {"oneOf": [{"required": ["a"], "additionalProperties": False, "properties": {"a": {}}},
               {"required": ["b"]}]},                                          # objects only
    {"type": "object", "required": ["kind"],
     "oneOf": [{"properties": {"kind": {"const": "cat"}}}, {"properties": {"kind": {"const": "dog"}}}]},
    {"type": "string", "oneOf": [{"enum": ["a", "b"]}, {}]},                   # "none of the enum"
])
def test_oneof_rewrites_are_exact(schema: dict) -> None:
    out = normalize_schema(schema)
    assert "oneOf" not in json.dumps(out)
    for v in POOL:
        assert valid(out, v) == valid(schema, v), (out, v)


# ---- the other rewrites ------------------------------------------------------------------------


def test_dependencies_as_branches_in_every_draft() -> None:
    for schema, draft in [({"dependencies": {"a": ["b"], "c": {"required": ["a"]}}}, D7),
                          ({"dependentRequired": {"a": ["b"]}, "dependentSchemas": {"c": {"maxProperties": 1}}}, D2020)]:
        out = normalize_schema({"$schema": draft, **schema})
        assert not any(k in json.dumps(out) for k in ("dependencies", "dependentRequired", "dependentSchemas"))
        for v in POOL:
            assert valid(out, v, draft) == valid(schema, v, draft)


def test_if_then_else() -> None:
    for schema in [{"if": {"type": "string"}, "then": {"minLength": 2}},
                   {"if": {"type": "string"}, "else": {"type": "array"}},
                   {"if": {"required": ["a"]}, "then": {"required": ["b"]}, "else": {"maxProperties": 0}}]:
        out = normalize_schema(schema)
        assert "if" not in out
        for v in POOL:
            assert valid(out, v) == valid(schema, v)


def test_unknown_formats_are_annotations_known_ones_stay() -> None:
    out = normalize_schema({"type": "object", "properties": {"c": {"type": "string", "format": "color"},
                                                              "d": {"type": "string", "format": "date"}}})
    assert out["properties"]["c"] == {"type": "string"}
    assert out["properties"]["d"]["format"] == "date"


def test_ref_siblings_are_void_up_to_draft_7_only() -> None:
    schema = {"$schema": D7, "$defs": {"s": {"type": "string"}}, "properties": {"a": {"$ref": "#/$defs/s", "minLength": 9}}}
    assert normalize_schema(schema)["properties"]["a"] == {"$ref": "#/$defs/s"}
    later = {**schema, "$schema": D2020}
    assert normalize_schema(later) is later


def test_a_bounded_enum_is_filtered_by_its_siblings() -> None:
    schema = {"allOf": [{"enum": [1, "ab", [1, 2], {"a": 1}]}, {"not": {"type": "string"}},
                        {"if": {"type": "array"}, "then": {"uniqueItems": True, "maxItems": 1}}]}
    out = normalize_schema(schema)
    assert out == {"enum": [1, {"a": 1}]}


def test_left_alone_when_no_exact_rewrite_or_annotations_matter() -> None:
    for schema in [{"not": {"multipleOf": 2}}, {"type": "array", "uniqueItems": True},
                   {"properties": {"a": {"not": {"type": "null"}}}, "unevaluatedProperties": False},
                   {"oneOf": [{"type": "array", "items": {"type": "integer"}}, {"type": "array", "maxItems": 3}]}]:
        assert normalize_schema(schema) is schema


def test_subtrees_a_ref_points_into_stay_in_place() -> None:
    schema = {"properties": {"a": {"not": {"properties": {"b": {"type": "string"}}}},
                             "c": {"$ref": "#/properties/a/not/properties/b"}}}
    out = normalize_schema(schema)
    assert out["properties"]["a"] == schema["properties"]["a"]


def test_compiler_normalises_only_what_a_backend_refuses(compiler: GuideCompiler) -> None:
    tok = compiler.tokenizer
    schema = {"type": "object", "properties": {"a": {"not": {"type": ["string", "null"]}}, "c": {"format": "color"}},
              "required": ["a"], "additionalProperties": False}
    grammar = compiler.compile_uncached(GuidedSpec("json_schema", schema))
    for value, ok in [({"a": 1}, True), ({"a": [True]}, True), ({"a": "x"}, False), ({"a": None}, False),
                      ({"a": 1, "c": "any"}, True)]:
        assert accepts(grammar, value, lambda s: tok.encode(s, add_special_tokens=False), tok.decode,
                       compiler.bitmask_words)[0] == ok, value
    with pytest.raises(InvalidArgumentError, match="not"):
        compiler.compile_uncached(GuidedSpec("json_schema", schema), normalize=False)


def test_what_the_validator_cannot_evaluate_is_left_alone() -> None:
    # Python's re has no \p{..}: the enum cannot be filtered by the pattern, so it stays.
    schema = {"enum": ["a", "b"], "pattern": "\\p{L}", "not": {"multipleOf": 2}}
    assert normalize_schema(schema) is schema


def test_oversized_rewrites_are_given_up() -> None:
    # A wide oneOf of overlapping objects: each branch with the complements of the seven others
    # is larger than MAX_NORMALIZED_BYTES, so the schema goes to the backend as sent.
    branch = {"type": "object", "properties": {f"p{i}": {"type": "string", "minLength": i} for i in range(60)}}
    schema = {"oneOf": [dict(branch, required=[f"p{j}"]) for j in range(8)]}
    assert normalize_schema(schema) is schema
