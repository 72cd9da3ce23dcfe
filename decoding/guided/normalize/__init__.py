"""The schema normaliser in front of the backends: exact rewrites into what they enforce.

`normalize_schema(schema)` returns a schema that accepts exactly the same JSON values, written
with keywords the backends enforce, or `schema` itself when nothing applies. Never an
approximation: a rewrite that cannot prove its result equivalent leaves its node alone, and the
backend then refuses the schema, naming the keyword, as before. Each rewrite is one function
over one schema object (children are rewritten first), in its own module:

- refs.py         up to draft 7, the keywords beside a `$ref` are void: dropped;
- formats.py      unknown `format`s are annotations: dropped (the drafts' formats stay asserted);
- dependencies.py `dependentRequired` / `dependentSchemas` / `dependencies` -> branches over
                  which properties are present;
- conditional.py  `if`/`then`/`else` -> `anyOf` of (if and then), (not-if and else);
- negate.py       `not X` -> the complement of X, without `not`;
- oneof.py        `oneOf` -> `anyOf` when the branches are provably disjoint, else each branch
                  conjoined with the complements of the branches it may overlap;
- literals.py     a schema bounded by an `enum`/`const` -> the values it accepts (evaluated by
                  `jsonschema`).

A document with `unevaluatedProperties`/`unevaluatedItems` (which see what other keywords
evaluated, so rewriting those changes them) or dynamic references is left alone.

The passes repeat (at most MAX_PASSES) because a complement can copy a referenced schema that
holds keywords of its own to rewrite. Equivalence is tested keyword by keyword against
`jsonschema` on the official JSON-Schema-Test-Suite (tests/test_guided_normalize.py).
"""
from __future__ import annotations

import json
from typing import Any

from decoding.guided.normalize.conditional import rewrite_conditional
from decoding.guided.normalize.dependencies import rewrite_dependencies
from decoding.guided.normalize.document import Document, Unprovable, WorkExceeded
from decoding.guided.normalize.formats import drop_unknown_format
from decoding.guided.normalize.literals import filter_literals
from decoding.guided.normalize.negate import negate, rewrite_not
from decoding.guided.normalize.oneof import rewrite_oneof
from decoding.guided.normalize.refs import drop_ref_siblings
from decoding.guided.normalize.walk import map_bottom_up

__all__ = ["normalize_schema", "negate", "Document"]

MAX_PASSES = 4
# A rewritten schema larger than this (JSON bytes) is given up: the original goes to the backend.
MAX_NORMALIZED_BYTES = 512 * 1024

_REWRITES = (drop_ref_siblings, drop_unknown_format, rewrite_dependencies, rewrite_conditional, rewrite_not, rewrite_oneof,
             filter_literals)


def normalize_schema(schema: Any) -> Any:
    """An equivalent schema the backends enforce more of, or `schema` itself."""
    if not isinstance(schema, dict):
        return schema
    doc = Document(schema)
    if doc.depends_on_evaluation:
        return schema

    def rewrite(node: Any, pointer: str) -> Any:
        out = node
        for step in _REWRITES:
            if not isinstance(out, dict):
                break
            try:
                out = step(out, pointer, doc)
            except WorkExceeded:
                raise
            except Unprovable:
                pass        # this step leaves the node as it was
        if out is False and any(p.startswith(pointer + "/") for p in doc.ref_pointers):
            return node     # something refers into it: keep its subtree where the ref finds it
        return out

    current: Any = schema
    try:
        for _ in range(MAX_PASSES):
            new = map_bottom_up(current, rewrite)
            if new is current:
                break
            current = new
    except (WorkExceeded, RecursionError):
        return schema
    if not isinstance(current, dict) or current is schema:
        return schema
    if len(json.dumps(current)) > MAX_NORMALIZED_BYTES:
        return schema
    return current
