"""Building schemas out of parts: conjunctions and disjunctions, simplified as they are built."""
from __future__ import annotations

from typing import Any

from decoding.guided.normalize.keywords import is_true


def any_of(schemas: list[Any]) -> Any:
    """The disjunction: `false` members dropped, nested bare `anyOf`s flattened, `true` if a
    member accepts everything, `false` if nothing is left."""
    flat: list[Any] = []
    for s in schemas:
        if s is False:
            continue
        if is_true(s):
            return True
        if isinstance(s, dict) and list(s) == ["anyOf"]:
            flat += s["anyOf"]
        else:
            flat.append(s)
    if not flat:
        return False
    return flat[0] if len(flat) == 1 else {"anyOf": flat}


def all_of(schemas: list[Any]) -> Any:
    """The conjunction: `true` members dropped, `false` if any member is."""
    kept = []
    for s in schemas:
        if s is False:
            return False
        if is_true(s):
            continue
        kept.append(s)
    if not kept:
        return True
    return kept[0] if len(kept) == 1 else {"allOf": kept}


def conjoin(node: Any, schema: Any) -> Any:
    """`node` with `schema` as one more conjunct (appended to its `allOf`)."""
    if is_true(schema) or node is False:
        return node
    if schema is False:
        return False
    if node is True:
        return schema
    members = node.get("allOf")
    return {**node, "allOf": [*(members if isinstance(members, list) else []), schema]}
