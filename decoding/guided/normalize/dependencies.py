"""`dependentRequired`, `dependentSchemas` and `dependencies` as branches over which properties
are present.

`{"dependentRequired": {"a": ["b", "c"]}}` holds when `a` is absent or `b` and `c` are present:
`anyOf: [{"properties": {"a": false}}, {"required": ["b", "c"]}]`; `dependentSchemas: {"a": S}`:
`anyOf: [{"properties": {"a": false}}, S]`. Both branches accept every non-object, as the keyword
does. `dependencies` (drafts 4-7, either form) is enforced in every draft: 2019-09 only split it
in two, and the schemas that still use it mean it.
"""
from __future__ import annotations

from typing import Any

from decoding.guided.normalize.combine import any_of, conjoin
from decoding.guided.normalize.document import Document
from decoding.guided.normalize.walk import child_pointer

_KEYS = ("dependentRequired", "dependentSchemas", "dependencies")


def absent(name: str) -> dict:
    return {"properties": {name: False}}


def rewrite_dependencies(node: dict, pointer: str, doc: Document) -> Any:
    present = [k for k in _KEYS if k in node]
    if not present or "$ref" in node and doc.draft <= 7:
        return node
    if any(not isinstance(node[k], dict) or doc.referenced_under(child_pointer(pointer, k)) for k in present):
        return node
    out: Any = {k: v for k, v in node.items() if k not in present}
    for key in present:
        for name, dep in node[key].items():
            if isinstance(dep, list):
                if not all(isinstance(n, str) for n in dep):
                    return node
                branch = any_of([absent(name), {"required": dep}]) if dep else True
            elif isinstance(dep, (dict, bool)):
                branch = any_of([absent(name), dep])
            else:
                return node
            out = conjoin(out, branch)
            if out is False:
                return False
    return out
