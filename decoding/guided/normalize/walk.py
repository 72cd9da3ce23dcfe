"""Where subschemas sit in a schema object, and a bottom-up map over them.

Only keywords whose values are schemas are followed; `enum`, `const`, `default` and `examples`
hold data, never schemas. Each subschema is visited with its JSON pointer, so that a rewrite can
tell whether some `$ref` points into what it would move (document.Document.referenced_under).
"""
from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

# Keywords whose value is one schema, a list of schemas, or a map from names to schemas.
ONE = ("not", "if", "then", "else", "items", "additionalItems", "contains", "additionalProperties",
       "propertyNames", "unevaluatedItems", "unevaluatedProperties")
LIST = ("allOf", "anyOf", "oneOf", "prefixItems", "items")
MAP = ("properties", "patternProperties", "dependentSchemas", "definitions", "$defs", "dependencies")

Rewrite = Callable[[Any, str], Any]


def is_schema(value: Any) -> bool:
    return isinstance(value, (dict, bool))


def escape(part: str) -> str:
    return part.replace("~", "~0").replace("/", "~1")


def unescape(part: str) -> str:
    return part.replace("~1", "/").replace("~0", "~")


def child_pointer(pointer: str, *parts: str | int) -> str:
    return pointer + "".join("/" + escape(str(p)) for p in parts)


def children(node: Any) -> Iterator[Any]:
    """The direct subschemas of a schema object."""
    if not isinstance(node, dict):
        return
    for key, value in node.items():
        if key in ONE and is_schema(value):
            yield value
        elif key in LIST and isinstance(value, list):
            yield from (v for v in value if is_schema(v))
        elif key in MAP and isinstance(value, dict):
            yield from (v for v in value.values() if is_schema(v))


def all_schemas(node: Any) -> Iterator[Any]:
    """`node` and every schema below it."""
    stack = [node]
    while stack:
        n = stack.pop()
        yield n
        stack.extend(children(n))


def has_key(node: Any, keys: tuple[str, ...]) -> bool:
    """Some schema object in `node` has one of `keys` (property names and data do not count)."""
    return any(isinstance(n, dict) and any(k in n for k in keys) for n in all_schemas(node))


def map_children(node: dict, fn: Rewrite, pointer: str) -> dict:
    """A copy of `node` with `fn(subschema, pointer)` applied to each direct subschema (the same
    object when nothing changed)."""
    out: dict | None = None
    for key, value in node.items():
        new = value
        if key in ONE and is_schema(value):
            new = fn(value, child_pointer(pointer, key))
        elif key in LIST and isinstance(value, list):
            items = [fn(v, child_pointer(pointer, key, i)) if is_schema(v) else v for i, v in enumerate(value)]
            if any(a is not b for a, b in zip(items, value)):
                new = items
        elif key in MAP and isinstance(value, dict):
            # `dependencies` also holds lists of names (draft 4-7): those are left as they are.
            entries = {k: fn(v, child_pointer(pointer, key, k)) if is_schema(v) else v for k, v in value.items()}
            if any(entries[k] is not value[k] for k in value):
                new = entries
        if new is not value:
            if out is None:
                out = dict(node)
            out[key] = new
    return node if out is None else out


def map_bottom_up(schema: Any, fn: Rewrite, pointer: str = "") -> Any:
    """Apply `fn(node, pointer)` to every schema object, children before their parent."""
    if not isinstance(schema, dict):
        return schema
    node = map_children(schema, lambda s, p: map_bottom_up(s, fn, p), pointer)
    return fn(node, pointer)
