"""JSON types a schema can accept, for proofs that two schemas share no instance.

Types are split finer than JSON Schema's names: "int" is a number with an integral value (1,
1.0, 1e3), "frac" one without (1.5); `"type": "number"` is both, `"integer"` only "int". The
sets computed here over-approximate: a value a schema accepts always has one of its types.
"""
from __future__ import annotations

from typing import Any

from decoding.guided.normalize.document import Document
from decoding.guided.normalize.keywords import constrains, is_true

INT, FRAC = "int", "frac"
ALL: frozenset[str] = frozenset({"null", "boolean", INT, FRAC, "string", "array", "object"})
_BY_NAME = {"null": {"null"}, "boolean": {"boolean"}, "integer": {INT}, "number": {INT, FRAC},
            "string": {"string"}, "array": {"array"}, "object": {"object"}}
# How deep `$ref`s are followed before giving up (a recursive schema is then "any type").
MAX_REF_DEPTH = 16


def type_of(value: Any) -> str:
    """The fine type of a JSON value."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return INT
    if isinstance(value, float):
        return INT if value.is_integer() else FRAC
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    return "object"


def named_types(t: Any) -> frozenset[str] | None:
    """The fine types of a `type` keyword's value; None when it is malformed."""
    names = t if isinstance(t, list) else [t]
    out: set[str] = set()
    for name in names:
        if not isinstance(name, str) or name not in _BY_NAME:
            return None
        out |= _BY_NAME[name]
    return frozenset(out)


def literals(schema: Any) -> list | None:
    """The finite set of values `schema` is restricted to by its own `enum`/`const`, or None."""
    if not isinstance(schema, dict):
        return None
    if "const" in schema:
        return [schema["const"]]
    if isinstance(schema.get("enum"), list):
        return list(schema["enum"])
    return None


def types_of(schema: Any, doc: Document, depth: int = 0) -> frozenset[str]:
    """The types of the values `schema` may accept (a superset)."""
    if schema is False:
        return frozenset()
    if not isinstance(schema, dict) or depth > MAX_REF_DEPTH:
        return ALL
    if "$ref" in schema:
        target = doc.resolve(schema["$ref"])
        resolved = ALL if target is None else types_of(target, doc, depth + 1)
        if doc.draft <= 7:          # siblings of $ref are ignored up to draft 7
            return resolved
    else:
        resolved = ALL
    out = set(resolved)
    if "type" in schema:
        named = named_types(schema["type"])
        if named is not None:
            out &= named
    lits = literals(schema)
    if lits is not None:
        out &= {type_of(v) for v in lits}
    for sub in schema.get("allOf", []) if isinstance(schema.get("allOf"), list) else []:
        out &= types_of(sub, doc, depth + 1)
    for key in ("anyOf", "oneOf"):
        members = schema.get(key)
        if isinstance(members, list) and members:
            union: set[str] = set()
            for sub in members:
                union |= types_of(sub, doc, depth + 1)
            out &= union
    return frozenset(out)


def type_keyword(types: frozenset[str]) -> list[str] | None:
    """The `type` keyword's value naming exactly `types`; None when they hold "frac" without
    "int" (a number that is not an integer has no name in JSON Schema)."""
    if FRAC in types and INT not in types:
        return None
    names = [n for n in ("null", "boolean", "string", "array", "object") if n in types]
    if INT in types:
        names.append("number" if FRAC in types else "integer")
    return names


# The keywords that constrain the values of one type (and pass every value of the others).
CLASSES: dict[str, frozenset[str]] = {
    "null": frozenset({"null"}), "boolean": frozenset({"boolean"}), "number": frozenset({INT, FRAC}),
    "string": frozenset({"string"}), "array": frozenset({"array"}), "object": frozenset({"object"}),
}
_CLASS_KEYWORDS = {
    "null": frozenset(), "boolean": frozenset(),
    "number": frozenset({"minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "multipleOf"}),
    "string": frozenset({"minLength", "maxLength", "pattern", "format"}),
    "array": frozenset({"items", "prefixItems", "additionalItems", "contains", "minContains", "maxContains",
                        "minItems", "maxItems", "uniqueItems", "unevaluatedItems"}),
    "object": frozenset({"properties", "patternProperties", "additionalProperties", "required", "minProperties",
                         "maxProperties", "dependentRequired", "dependentSchemas", "dependencies", "propertyNames",
                         "unevaluatedProperties"}),
}
# Values of those keywords that constrain nothing.
_NEUTRAL = {"minLength": 0, "minItems": 0, "minProperties": 0, "required": [], "uniqueItems": False}


def accepts_every(schema: Any, cls: str, doc: Document, depth: int = 0) -> bool:
    """A proof that `schema` accepts every value of the type class `cls` ("number" is integers
    and the rest); False: none found."""
    if schema is True:
        return True
    if not isinstance(schema, dict) or depth > MAX_REF_DEPTH:
        return False
    if "$ref" in schema:
        target = doc.resolve(schema["$ref"])
        if target is None or not accepts_every(target, cls, doc, depth + 1):
            return False
        if doc.draft <= 7:
            return True
    for key, value in schema.items():
        if key in ("$ref",) or not constrains(schema, key):
            continue
        if key == "type":
            named = named_types(value)
            if named is None or not CLASSES[cls] <= named:
                return False
        elif key == "allOf":
            if not isinstance(value, list) or not all(accepts_every(m, cls, doc, depth + 1) for m in value):
                return False
        elif key == "anyOf":
            if not isinstance(value, list) or not any(accepts_every(m, cls, doc, depth + 1) for m in value):
                return False
        elif key in _CLASS_KEYWORDS[cls]:
            if key in ("properties", "patternProperties"):
                trivial = isinstance(value, dict) and all(is_true(v) for v in value.values())
            elif key in ("dependentRequired", "dependentSchemas", "dependencies"):
                trivial = value == {}
            else:
                trivial = is_true(value) or (key in _NEUTRAL and value == _NEUTRAL[key])
            if not trivial:
                return False
        elif any(key in kws for kws in _CLASS_KEYWORDS.values()):
            continue        # a keyword of another type: passes every value of this one
        else:
            return False    # enum, const, oneOf, not, if, ...: not proved
    return True
