"""`not`: the complement of a schema, written without `not`, when it can be.

A schema object is the conjunction of its keywords, and each keyword constrains only values of
its own types (`minLength` passes every non-string). So the complement is the disjunction of
the keywords' complements, each of which names its type:

- `type`: the other types ("a number that is not an integer" has no name: not negated);
- `enum`/`const` (with whatever is beside them, evaluated on each value): every other value of
  each type: other types whole, numbers in the open intervals between the listed ones, strings
  by a regex (strings.py), the other boolean; listed arrays and objects: not negated;
- `required`: an object without one of the names; `dependentRequired`: one name without another;
- `properties`: an object with one of the properties present and its value in the complement;
- `prefixItems` (draft 4-2019: `items` as a list): an array long enough, with one element in the
  complement; `items: false` after them: one element too many;
- bounds (`minLength`, `maxItems`, `minimum`, ...): the bound on the other side, as the draft
  spells it (draft 4: `exclusiveMinimum: true`);
- `pattern`: the strings it does not match, for the shapes strings.py knows;
- `allOf` -> `anyOf` of complements, `anyOf` -> `allOf` of complements, `not` -> the schema,
  `oneOf` -> none or two of them, `if`/`then`/`else` -> (if and not then) or (not if and not else),
  `$ref` -> the complement of its (non-recursive) target.

Everything else (`multipleOf`, `uniqueItems`, `contains`, `patternProperties`, asserted formats,
`additionalProperties` other than `true` ...) has no complement here: `negate` returns None and
the caller leaves its schema as it was.
"""
from __future__ import annotations

import math
from typing import Any

from decoding.guided.normalize.combine import all_of, any_of, conjoin
from decoding.guided.normalize.disjoint import disjoint
from decoding.guided.normalize.document import Document
from decoding.guided.normalize.keywords import DEFINED_FORMATS, VALIDATION, is_true
from decoding.guided.normalize.literals import bounding_literals, complement_of_values
from decoding.guided.normalize.strings import not_matching
from decoding.guided.normalize.types import ALL, MAX_REF_DEPTH, named_types, type_keyword
from decoding.guided.normalize.walk import child_pointer, has_key

Schema = Any
# Keywords handled below; any other validation keyword makes a schema non-negatable.
_BOUNDS = {"minLength": ("string", "maxLength", -1), "maxLength": ("string", "minLength", 1),
           "minItems": ("array", "maxItems", -1), "maxItems": ("array", "minItems", 1),
           "minProperties": ("object", "maxProperties", -1), "maxProperties": ("object", "minProperties", 1)}


def negate(schema: Schema, doc: Document, depth: int = 0) -> Schema | None:
    """A schema accepting exactly the values `schema` rejects (`False` when it accepts every
    value, `True` when it accepts none), or None when none is known."""
    if schema is True:
        return False
    if schema is False:
        return True
    if not isinstance(schema, dict) or depth > MAX_REF_DEPTH:
        return None
    doc.spend()
    if is_true(schema):
        return False
    if "$ref" in schema and doc.draft <= 7:      # siblings of $ref are ignored up to draft 7
        target = doc.resolve(schema["$ref"])
        return None if target is None else negate(target, doc, depth + 1)
    values = bounding_literals(schema, doc)
    if values is not None:
        # A finite set, whatever is beside it: keep the values the whole schema accepts.
        if not doc.evaluable(schema) or has_key(schema, ("format",)):
            return None
        kept = [v for v in values if doc.is_valid(v, schema)]
        return complement_of_values(kept, doc)
    disjuncts: list[Schema] = []
    handled: set[str] = set()
    for step in (_types, _bounds, _numbers, _strings, _objects, _arrays, _applicators, _conditional):
        out = step(schema, doc, depth, handled)
        if out is None:
            return None
        disjuncts += out
    if schema.get("format") in DEFINED_FORMATS:
        return None         # an asserted format has no complement here
    handled.add("format")   # any other format is an annotation
    if any(key in VALIDATION and key not in handled for key in schema):
        return None
    return any_of(disjuncts)


# ---- one step per keyword family: a list of disjuncts, or None when one has no complement ----


def _types(schema: dict, doc: Document, depth: int, handled: set[str]) -> list | None:
    if "type" not in schema:
        return []
    handled.add("type")
    named = named_types(schema["type"])
    if named is None:
        return None
    rest = ALL - named
    if not rest:
        return []
    names = type_keyword(rest)
    return None if names is None else [{"type": names}]


def _bounds(schema: dict, doc: Document, depth: int, handled: set[str]) -> list | None:
    out = []
    for key, (type_name, other, step) in _BOUNDS.items():
        if key not in schema:
            continue
        handled.add(key)
        n = schema[key]
        if not _count(n):
            return None
        n = int(n) + step
        if n < 0:
            continue          # minLength 0: no constraint, nothing in its complement
        out.append({"type": type_name, other: n})
    return out


def _count(n: Any) -> bool:
    return isinstance(n, (int, float)) and not isinstance(n, bool) and math.isfinite(n) and n >= 0 and n == int(n)


def _number(n: Any) -> bool:
    return isinstance(n, (int, float)) and not isinstance(n, bool) and math.isfinite(n)


def _numbers(schema: dict, doc: Document, depth: int, handled: set[str]) -> list | None:
    out = []
    for key in ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "multipleOf"):
        if key in schema:
            handled.add(key)
    if "multipleOf" in schema:
        return None
    if doc.draft <= 4:
        for bound, flag, other, other_flag in (("minimum", "exclusiveMinimum", "maximum", "exclusiveMaximum"),
                                               ("maximum", "exclusiveMaximum", "minimum", "exclusiveMinimum")):
            if bound not in schema:
                continue
            if not _number(schema[bound]) or not isinstance(schema.get(flag, False), bool):
                return None
            # x >= m  ->  x < m;   x > m  ->  x <= m
            neg = {"type": "number", other: schema[bound]}
            if not schema.get(flag, False):
                neg[other_flag] = True
            out.append(neg)
        return out
    for key, neg_key in (("minimum", "exclusiveMaximum"), ("maximum", "exclusiveMinimum"),
                         ("exclusiveMinimum", "maximum"), ("exclusiveMaximum", "minimum")):
        if key in schema:
            if not _number(schema[key]):
                return None
            out.append({"type": "number", neg_key: schema[key]})
    return out


def _strings(schema: dict, doc: Document, depth: int, handled: set[str]) -> list | None:
    if "pattern" not in schema:
        return []
    handled.add("pattern")
    if not isinstance(schema["pattern"], str):
        return None
    neg = not_matching(schema["pattern"])
    return None if neg is None else [neg]


def _objects(schema: dict, doc: Document, depth: int, handled: set[str]) -> list | None:
    out: list = []
    for key in ("required", "properties", "dependentRequired", "dependentSchemas", "dependencies",
                "additionalProperties", "patternProperties", "propertyNames"):
        if key in schema:
            handled.add(key)
    for key in ("additionalProperties", "propertyNames"):
        if key in schema and not is_true(schema[key]):
            return None
    patterns = schema.get("patternProperties", {})
    if not isinstance(patterns, dict) or not all(is_true(s) for s in patterns.values()):
        return None
    required = schema.get("required", [])
    if not isinstance(required, list):
        return None
    out += [{"type": "object", "properties": {name: False}} for name in required]
    props = schema.get("properties", {})
    if not isinstance(props, dict):
        return None
    for name, sub in props.items():
        neg = negate(sub, doc, depth + 1)
        if neg is None:
            return None
        if neg is not False:
            out.append({"type": "object", "required": [name], "properties": {name: neg}})
    deps: dict = {}
    for key in ("dependentRequired", "dependentSchemas", "dependencies"):
        value = schema.get(key, {})
        if not isinstance(value, dict):
            return None
        for name, dep in value.items():
            deps.setdefault(name, []).append(dep)
    for name, found in deps.items():
        for dep in found:
            if isinstance(dep, list):
                out += [{"type": "object", "required": [name], "properties": {other: False}} for other in dep]
                continue
            neg = negate(dep, doc, depth + 1)
            if neg is None:
                return None
            if neg is not False:
                out.append(all_of([{"type": "object", "required": [name]}, neg]))
    return out


def _arrays(schema: dict, doc: Document, depth: int, handled: set[str]) -> list | None:
    for key in ("items", "prefixItems", "additionalItems", "uniqueItems", "contains", "minContains",
                "maxContains", "unevaluatedItems", "unevaluatedProperties"):
        if key in schema:
            handled.add(key)
    if schema.get("uniqueItems", False) is not False or "contains" in schema:
        return None
    for key in ("unevaluatedItems", "unevaluatedProperties"):
        if key in schema and not is_true(schema[key]):
            return None
    if doc.draft >= 2020:
        prefix, rest = schema.get("prefixItems", []), schema.get("items", True)
    elif isinstance(schema.get("items"), list):
        prefix, rest = schema["items"], schema.get("additionalItems", True)
    else:
        prefix, rest = [], schema.get("items", True)
        if not is_true(schema.get("additionalItems", True)) and "items" in schema:
            return None       # additionalItems beside a single items schema: ignored; keep it simple
    if not isinstance(prefix, list):
        return None
    out: list = []
    for i, sub in enumerate(prefix):
        neg = negate(sub, doc, depth + 1)
        if neg is None:
            return None
        if neg is not False:
            tuple_ = [True] * i + [neg]
            out.append({"type": "array", "minItems": i + 1,
                        **({"prefixItems": tuple_} if doc.draft >= 2020 else {"items": tuple_})})
    if rest is False:
        out.append({"type": "array", "minItems": len(prefix) + 1})
    elif not is_true(rest):
        return None
    return out


def _applicators(schema: dict, doc: Document, depth: int, handled: set[str]) -> list | None:
    out: list = []
    for key in ("allOf", "anyOf", "oneOf", "not", "$ref"):
        if key in schema:
            handled.add(key)
    if "$ref" in schema:
        target = doc.resolve(schema["$ref"])
        neg = None if target is None else negate(target, doc, depth + 1)
        if neg is None:
            return None
        out.append(neg)
    if "not" in schema:
        out.append(schema["not"])
    members = schema.get("allOf", [])
    if not isinstance(members, list):
        return None
    for sub in members:
        neg = negate(sub, doc, depth + 1)
        if neg is None:
            return None
        out.append(neg)
    for key in ("anyOf", "oneOf"):
        if key not in schema:
            continue
        members = schema[key]
        if not isinstance(members, list) or not members:
            return None
        negs = [negate(sub, doc, depth + 1) for sub in members]
        if any(n is None for n in negs):
            return None
        out.append(all_of(negs))            # none of them
        if key == "oneOf":                  # or two of them at once
            for i in range(len(members)):
                for j in range(i + 1, len(members)):
                    if not disjoint(members[i], members[j], doc):
                        out.append(all_of([members[i], members[j]]))
    return out


def _conditional(schema: dict, doc: Document, depth: int, handled: set[str]) -> list | None:
    for key in ("if", "then", "else"):
        if key in schema:
            handled.add(key)
    if "if" not in schema or doc.draft < 7:
        return []
    cond, then, else_ = schema["if"], schema.get("then", True), schema.get("else", True)
    neg_then, neg_else = negate(then, doc, depth + 1), negate(else_, doc, depth + 1)
    if neg_then is None or neg_else is None:
        return None
    out = []
    if neg_then is not False:
        out.append(all_of([cond, neg_then]))
    if neg_else is not False:
        neg_cond = negate(cond, doc, depth + 1)
        if neg_cond is None:
            return None
        out.append(all_of([neg_cond, neg_else]))
    return out


def rewrite_not(node: dict, pointer: str, doc: Document) -> Any:
    """`not: X` as one more conjunct: the complement of X (left alone when it has none)."""
    if "not" not in node or "$ref" in node and doc.draft <= 7:
        return node
    if doc.referenced_under(child_pointer(pointer, "not")):
        return node
    neg = negate(node["not"], doc)
    if neg is None:
        return node
    return conjoin({k: v for k, v in node.items() if k != "not"}, neg)
