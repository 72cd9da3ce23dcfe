"""`if`/`then`/`else` as `anyOf: [{allOf: [if, then]}, {allOf: [not-if, else]}]`.

Without `then` that is `anyOf: [if, else]` and needs no complement; otherwise the complement of
`if` must be expressible (negate.py), or the schema is left alone. Before draft 7 the keywords
do not exist (annotations): they are dropped.
"""
from __future__ import annotations

from typing import Any

from decoding.guided.normalize.combine import all_of, any_of, conjoin
from decoding.guided.normalize.document import Document
from decoding.guided.normalize.keywords import is_true
from decoding.guided.normalize.negate import negate
from decoding.guided.normalize.walk import child_pointer

_KEYS = ("if", "then", "else")


def rewrite_conditional(node: dict, pointer: str, doc: Document) -> Any:
    present = [k for k in _KEYS if k in node]
    if not present or "$ref" in node and doc.draft <= 7:
        return node
    if any(doc.referenced_under(child_pointer(pointer, k)) for k in present):
        return node
    rest = {k: v for k, v in node.items() if k not in present}
    if "if" not in node or doc.draft < 7:
        return rest
    cond, then, else_ = node["if"], node.get("then", True), node.get("else", True)
    if is_true(then):
        return conjoin(rest, any_of([cond, else_]))
    neg_cond = negate(cond, doc)
    if neg_cond is None:
        return node
    return conjoin(rest, any_of([all_of([cond, then]), all_of([neg_cond, else_])]))
