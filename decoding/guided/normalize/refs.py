"""Up to draft 7, `$ref` makes its siblings void: they are dropped.

Drafts 4, 6 and 7 say a schema object with `$ref` is that reference and nothing else: validators
ignore every other keyword beside it (2019-09 made them conjuncts). Backends that read the
siblings anyway enforce more than the schema says, or refuse it (llguidance: "circular
references with sibling keys"). The validation keywords beside such a `$ref` are dropped;
annotations and `definitions` stay (a `$ref` may point into them).
"""
from __future__ import annotations

from typing import Any

from decoding.guided.normalize.document import Document
from decoding.guided.normalize.keywords import VALIDATION
from decoding.guided.normalize.walk import child_pointer


def drop_ref_siblings(node: dict, pointer: str, doc: Document) -> Any:
    if "$ref" not in node or doc.draft > 7:
        return node
    void = [k for k in node if k != "$ref" and k in VALIDATION]
    if not void or any(doc.referenced_under(child_pointer(pointer, k)) for k in void):
        return node
    return {k: v for k, v in node.items() if k not in void}
