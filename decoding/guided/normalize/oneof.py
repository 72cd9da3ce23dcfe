"""`oneOf` as `anyOf`: exactly one branch holds.

When every two branches are provably disjoint (disjoint.py: different types, different
`const`/`enum` discriminators, a property one requires and the other forbids), "exactly one" is
"at least one": the keyword is renamed. The proof may also go type by type: on each type, the
branches that admit it are disjoint there, or two of them accept every value of it (then
`oneOf` rejects that type: `type` keeps the others); two object branches without `type` that
differ only on objects make the schema `{"type": "object", "anyOf": [...]}`. Otherwise each branch is conjoined with the complements
of the branches it may overlap: `oneOf: [A, B]` = `anyOf: [{allOf: [A, not-B]}, {allOf: [B,
not-A]}]`, when those complements are expressible (negate.py); a branch conjoined with `false`
drops out (`oneOf: [{enum: [...]}, {}]` is "none of the enum"). Otherwise the schema is left alone.
"""
from __future__ import annotations

from typing import Any

from decoding.guided.normalize.combine import all_of, any_of, conjoin
from decoding.guided.normalize.disjoint import disjoint
from decoding.guided.normalize.document import Document
from decoding.guided.normalize.keywords import constrains
from decoding.guided.normalize.negate import negate
from decoding.guided.normalize.types import CLASSES, accepts_every, type_keyword, types_of
from decoding.guided.normalize.walk import child_pointer

# At most this many branches are made exclusive by complements (n * (n - 1) of them).
MAX_BRANCHES = 8


def rewrite_oneof(node: dict, pointer: str, doc: Document) -> Any:
    members = node.get("oneOf")
    if not isinstance(members, list) or not members or "$ref" in node and doc.draft <= 7:
        return node
    if doc.referenced_under(child_pointer(pointer, "oneOf")):
        return node
    rest = {k: v for k, v in node.items() if k != "oneOf"}
    n = len(members)
    # The proofs see each branch with what is beside the `oneOf` (a `required` there makes a
    # discriminator in the branches decisive).
    context = {k: v for k, v in rest.items() if constrains(rest, k)}
    seen = [{"allOf": [context, m]} if context else m for m in members]
    overlaps = {(i, j) for i in range(n) for j in range(n)
                if i < j and not disjoint(seen[i], seen[j], doc)}
    if not overlaps:
        if "anyOf" not in rest:
            return {**rest, "anyOf": members}
        return conjoin(rest, any_of(members))
    kept = _exclusive_types(seen, doc)
    if kept is not None:
        names = type_keyword(frozenset().union(*(CLASSES[c] for c in kept)))
        if names is not None:
            return conjoin(conjoin(rest, {"type": names} if names else False), any_of(members))
    if n > MAX_BRANCHES:
        return node
    negs: dict[int, Any] = {}
    for i, j in overlaps:
        for k in (i, j):
            if k not in negs:
                negs[k] = negate(members[k], doc)
                if negs[k] is None:
                    return node
    branches = []
    for i, member in enumerate(members):
        others = [negs[j] for j in range(n) if j != i and (min(i, j), max(i, j)) in overlaps]
        branches.append(all_of([member, *others]))
    return conjoin(rest, any_of(branches))


def _exclusive_types(members: list, doc: Document) -> list[str] | None:
    """The type classes on which `oneOf: members` is `anyOf: members`, when on every other class
    two members accept every value (so `oneOf` rejects it); None when some class is neither."""
    kept = []
    for cls, fine in CLASSES.items():
        admitting = [m for m in members if types_of(m, doc) & fine]
        if all(disjoint(admitting[i], admitting[j], doc, within=fine)
               for i in range(len(admitting)) for j in range(i + 1, len(admitting))):
            kept.append(cls)
        elif sum(accepts_every(m, cls, doc) for m in admitting) < 2:
            return None
    return kept
