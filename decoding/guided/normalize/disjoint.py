"""Proofs that two schemas accept no common value (what makes `oneOf` an `anyOf`).

`disjoint(a, b)` is True only with a proof; False means "not proved". The rules:
- their types do not meet (`string` vs `null`; `$ref`, `allOf`, `anyOf` and `enum` followed);
- one is a finite set of values (`enum`, `const`) none of which the other accepts (evaluated by
  `jsonschema`);
- a conjunct of one (an `allOf` member, its `$ref`) is disjoint from the other, or every `anyOf`
  branch of one is;
- both are objects only, and one requires a property the other forbids (`"p": false`, or
  `additionalProperties: false` without `p` among its properties), or one requires a property
  to which the two give disjoint schemas (different `const`/`enum` discriminators; the other's
  `additionalProperties` when `p` is not among its properties).
"""
from __future__ import annotations

from typing import Any

from decoding.guided.normalize.document import Document, Unprovable, WorkExceeded
from decoding.guided.normalize.keywords import constrains, is_true
from decoding.guided.normalize.types import ALL, MAX_REF_DEPTH, literals, types_of
from decoding.guided.normalize.walk import has_key


def _deref(schema: Any, doc: Document, depth: int) -> Any:
    """A `$ref`-only schema (or any, up to draft 7, where siblings are ignored) as its target."""
    while isinstance(schema, dict) and "$ref" in schema and depth <= MAX_REF_DEPTH:
        if doc.draft > 7 and any(k != "$ref" and constrains(schema, k) for k in schema):
            return schema
        target = doc.resolve(schema["$ref"])
        if target is None:
            return schema
        schema, depth = target, depth + 1
    return schema


def _conjuncts(schema: dict, doc: Document) -> list[Any]:
    parts = list(schema["allOf"]) if isinstance(schema.get("allOf"), list) else []
    if "$ref" in schema:
        target = doc.resolve(schema["$ref"])
        if target is not None:
            parts.append(target)
    return parts


def _required(schema: dict) -> set[str]:
    names = {n for n in schema.get("required", []) if isinstance(n, str)} if isinstance(
        schema.get("required"), list) else set()
    for member in schema.get("allOf", []) if isinstance(schema.get("allOf"), list) else []:
        if isinstance(member, dict):
            names |= _required(member)
    return names


def _property_schemas(schema: dict, name: str) -> list[Any]:
    """Schemas a property's value must satisfy: its own (else `additionalProperties`, when no
    `patternProperties` could apply), and those of the `allOf` members."""
    out = []
    props = schema.get("properties") if isinstance(schema.get("properties"), dict) else {}
    if name in props:
        out.append(props[name])
    elif "patternProperties" not in schema and "additionalProperties" in schema:
        out.append(schema["additionalProperties"])
    for member in schema.get("allOf", []) if isinstance(schema.get("allOf"), list) else []:
        if isinstance(member, dict):
            out += _property_schemas(member, name)
    return out


def _forbids(schema: dict, name: str) -> bool:
    props = schema.get("properties") if isinstance(schema.get("properties"), dict) else {}
    if name in props:
        return props[name] is False or (isinstance(props[name], dict) and is_true(props[name].get("not", False)))
    return schema.get("additionalProperties") is False and not schema.get("patternProperties")


def _evaluable_literal_proof(x: dict, y: Any, doc: Document) -> bool:
    values = literals(x)
    if values is None or not doc.evaluable(x) or not doc.evaluable(y) or has_key(x, ("format",)) or has_key(y, ("format",)):
        return False
    try:
        return not any(doc.is_valid(v, x) and doc.is_valid(v, y) for v in values)
    except Unprovable as exc:
        if isinstance(exc, WorkExceeded):
            raise
        return False


def disjoint(a: Any, b: Any, doc: Document, depth: int = 0, within: frozenset[str] = ALL) -> bool:
    """A proof that no value of the types `within` is valid under both `a` and `b` (False: none
    found)."""
    if a is False or b is False:
        return True
    if depth > MAX_REF_DEPTH:
        return False
    doc.spend()
    a, b = _deref(a, doc, depth), _deref(b, doc, depth)
    if not isinstance(a, dict) or not isinstance(b, dict):
        return False
    common = types_of(a, doc) & types_of(b, doc) & within
    if not common:
        return True
    for x, y in ((a, b), (b, a)):
        if _evaluable_literal_proof(x, y, doc):
            return True
    for x, y in ((a, b), (b, a)):
        if any(disjoint(part, y, doc, depth + 1, common) for part in _conjuncts(x, doc)):
            return True
        for key in ("anyOf", "oneOf"):
            branches = x.get(key)
            if isinstance(branches, list) and branches and all(
                    disjoint(m, y, doc, depth + 1, common) for m in branches):
                return True
    if common <= {"object"}:
        for x, y in ((a, b), (b, a)):
            if any(_forbids(y, name) for name in _required(x)):
                return True
        for name in _required(a) | _required(b):
            # One side requires the property, so a common value has it, and its value would
            # have to satisfy two disjoint schemas.
            if any(disjoint(sa, sb, doc, depth + 1)
                   for sa in _property_schemas(a, name) for sb in _property_schemas(b, name)):
                return True
    return False
