"""JSON lets an object repeat a key; `json.loads` (and every parser a client uses) keeps the last
one. A grammar cannot remember which free keys (`patternProperties`, `additionalProperties`) an
object already has, so it may write one twice — harmless for the value keywords (each copy was
checked), but `minProperties` then counts the copy: `{"d": 1, "b": 2, "b": 3}` meets a grammar's
"3 properties" and parses to 2. Such a schema is refused, naming the keyword, until the guide
tracks the keys it wrote. An object whose keys are all named properties is safe: the backends
write each named property once."""
from __future__ import annotations

from typing import Any

from common.errors import InvalidArgumentError


def _open_keys(node: dict) -> bool:
    """Whether an object of this schema may have keys beyond its named properties."""
    return bool(node.get("patternProperties")) or node.get("additionalProperties", True) is not False


def counted_duplicates(schema: Any, path: str = "#") -> str | None:
    """The JSON pointer of the first `minProperties` >= 2 on an object with open keys, else None."""
    if isinstance(schema, dict):
        least = schema.get("minProperties")
        if isinstance(least, int) and not isinstance(least, bool) and least >= 2 and _open_keys(schema):
            return path
        for key, value in schema.items():
            if key in ("const", "enum", "default", "examples"):   # values, not schemas
                continue
            found = counted_duplicates(value, f"{path}/{key}")
            if found:
                return found
    elif isinstance(schema, list):
        for i, value in enumerate(schema):
            found = counted_duplicates(value, f"{path}/{i}")
            if found:
                return found
    return None


def refuse_counted_duplicates(schema: Any, field: str) -> None:
    where = counted_duplicates(schema)
    if where is not None:
        raise InvalidArgumentError(
            field, f"unsupported keyword 'minProperties' (at {where}) on an object that admits keys beyond its "
                   "named properties: a grammar may write such a key twice and count it twice (JSON parsers keep "
                   "one); list the properties with additionalProperties false, or drop minProperties")
