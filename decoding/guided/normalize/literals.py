"""Finite sets of values: a schema bounded by an `enum` or `const` is that set, filtered.

When a schema can only accept the values of some `enum`/`const` (its own, an `allOf` member's,
or every `anyOf` branch's), it is exactly the list of those values it accepts, whatever else it
says (`not`, `if`, `uniqueItems`, ...): `jsonschema` evaluates the schema on each value, and the
schema becomes `{"enum": [the values it accepts]}`. And the complement of a finite set is
written per type (`complement_of_values`), which `not` needs.
"""
from __future__ import annotations

from typing import Any

from decoding.guided.normalize.combine import any_of
from decoding.guided.normalize.document import Document
from decoding.guided.normalize.keywords import constrains
from decoding.guided.normalize.strings import other_than
from decoding.guided.normalize.types import ALL, FRAC, INT, MAX_REF_DEPTH, literals, type_keyword, type_of
from decoding.guided.normalize.walk import child_pointer, has_key


def bounding_literals(schema: Any, doc: Document, depth: int = 0) -> list | None:
    """Values that include every value `schema` accepts, when finitely many are known."""
    if not isinstance(schema, dict) or depth > MAX_REF_DEPTH:
        return None
    if "$ref" in schema:
        target = doc.resolve(schema["$ref"])
        found = None if target is None else bounding_literals(target, doc, depth + 1)
        if doc.draft <= 7 or found is not None:    # up to draft 7 the siblings are ignored
            return found
    own = literals(schema)
    if own is not None:
        return own
    members = schema.get("allOf")
    for sub in members if isinstance(members, list) else []:
        found = bounding_literals(sub, doc, depth + 1)
        if found is not None:
            return found
    for key in ("anyOf", "oneOf"):
        members = schema.get(key)
        if isinstance(members, list) and members:
            union: list = []
            for sub in members:
                found = bounding_literals(sub, doc, depth + 1)
                if found is None:
                    break
                union += found
            else:
                return union
    return None


def filter_literals(node: dict, pointer: str, doc: Document) -> Any:
    """`node` as the `enum` of the values it accepts, when it is bounded by finitely many and says
    more than `enum`/`const`/`type`; otherwise `node` itself."""
    values = bounding_literals(node, doc)
    if values is None:
        return node
    constraints = [k for k in node if constrains(node, k)]
    if set(constraints) <= {"enum", "const", "type"}:
        return node
    if not doc.evaluable(node) or has_key(node, ("format",)):
        return node
    if any(doc.referenced_under(child_pointer(pointer, k)) for k in constraints):
        return node
    kept = [v for v in values if doc.is_valid(v, node)]
    if not kept:
        return False
    out = {k: v for k, v in node.items() if not constrains(node, k)}
    out["enum"] = kept
    return out


def complement_of_values(values: list, doc: Document) -> Any:
    """A schema accepting exactly the JSON values not in `values`, or None (a listed array or
    object, or strings strings.py cannot complement)."""
    by_type: dict[str, list] = {}
    for v in values:
        by_type.setdefault(type_of(v), []).append(v)
    if "array" in by_type or "object" in by_type:
        return None
    whole = set(ALL) - set(by_type)
    parts: list[Any] = []
    if "boolean" in by_type:
        left = [b for b in (False, True) if b not in by_type["boolean"]]
        if left:
            parts.append({"enum": left})
    numbers = sorted({float(v) if isinstance(v, float) else v for t in (INT, FRAC) for v in by_type.get(t, [])})
    if numbers:
        whole -= {INT, FRAC}
        parts += _between(numbers, doc.draft)
    if "string" in by_type:
        rx = other_than([s for s in by_type["string"]])
        if rx is None:
            return None
        parts.append({"type": "string", "pattern": rx})
    names = type_keyword(frozenset(whole))
    if names is None:
        return None
    if names:
        parts.insert(0, {"type": names})
    return any_of(parts)


def _between(numbers: list, draft: int) -> list[dict]:
    """Numbers other than `numbers` (sorted): the open intervals around them."""
    def above(x: Any) -> dict:
        return {"minimum": x, "exclusiveMinimum": True} if draft <= 4 else {"exclusiveMinimum": x}

    def below(x: Any) -> dict:
        return {"maximum": x, "exclusiveMaximum": True} if draft <= 4 else {"exclusiveMaximum": x}

    out = [{"type": "number", **below(numbers[0])}]
    out += [{"type": "number", **above(lo), **below(hi)} for lo, hi in zip(numbers, numbers[1:]) if lo != hi]
    out.append({"type": "number", **above(numbers[-1])})
    return out
